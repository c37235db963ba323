"""Finding a checkpoint's safetensors files and reading them: memory-mapped, or one tensor at a time.

Weights kept in the stored dtype are memory-mapped, as Hugging Face's loader does: CPU weights stay views
of the file, read on first use, and processing writes into them in place (the file is mapped privately,
so only the pages written become process memory, copy-on-write). When loading casts (a float16 checkpoint
loaded in float32, say), every tensor is copied anyway, and the mapped pages a cast has read would stay
resident until every tensor of the file is freed, beside the copies; then each tensor is read into its own
buffer (safetensors' ``pread`` backend), freed once cast.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# from_pretrained keyword arguments that say where the files are (hub ids and local folders alike).
# Mis-shaped weights listed in transformers' loading report (which the caller turns into an error
# naming them) instead of a RuntimeError whose details only reach the log.
STRICT_REPORT = {"ignore_mismatched_sizes": True}
# safetensors' names of the floating-point dtypes transformers casts to the requested dtype.
_STORED_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def safetensors_files(name_or_path: str, **hub_kwargs: Any) -> list[str] | None:
    """Local paths of the checkpoint's safetensors files (downloaded and cached for hub ids, as
    transformers does), or None when it has none (e.g. pickle-only checkpoints)."""
    from transformers.utils import cached_file
    from transformers.utils.hub import get_checkpoint_shard_files

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
    quiet = dict(_raise_exceptions_for_missing_entries=False)  # a missing file is an answer; no network is not
    single = cached_file(name_or_path, SAFE_WEIGHTS, **quiet, **hub_kwargs)
    if single is not None:
        return [single]
    index = cached_file(name_or_path, SAFE_INDEX, **quiet, **hub_kwargs)
    if index is None:
        return None
    shards, _ = get_checkpoint_shard_files(name_or_path, index, **hub_kwargs)
    return list(shards)


def load_generation_config(name_or_path: str, **hub_kwargs: Any) -> Any:
    """The checkpoint's ``generation_config.json`` as a ``GenerationConfig`` (its stop and pad tokens, which
    HF's ``from_pretrained`` reads and a model built from a state dict does not), or None when it has none."""
    from transformers import GenerationConfig
    from transformers.utils import cached_file

    hub_kwargs = {k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS}
    found = cached_file(name_or_path, "generation_config.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    return None if found is None else GenerationConfig.from_pretrained(name_or_path, **hub_kwargs)


def load_hf_model(hf_class: type, config: Any, files: list[str], dtype: Any, *, device: Any = "cpu",
                  **kwargs: Any) -> tuple[Any, dict]:
    """``hf_class.from_pretrained`` on the given safetensors files, each tensor placed on ``device`` as it is
    read (transformers builds the model on the meta device first and materialises one weight at a time).

    Files are memory-mapped unless loading in ``dtype`` casts their weights (then read one tensor at a
    time; see the module's docstring). On another device, the host holds only the tensors in flight.
    transformers still applies its key renaming, dtype casts and missing/unexpected-key report; only the
    reading is ours. Returns the model and transformers' loading info.
    """
    from safetensors import safe_open

    mapped = not casts(files, dtype)
    with ExitStack() as stack:
        lazy: dict[str, Any] = {}
        for path in files:
            handle = stack.enter_context(_open(safe_open, path, mapped))
            for key in handle.keys():
                lazy[key] = handle.get_slice(key)  # read when transformers asks for it
        kwargs = {k: v for k, v in kwargs.items() if k not in HUB_KWARGS}
        if str(device) != "cpu":
            kwargs["device_map"] = {"": device}
        return hf_class.from_pretrained(None, config=config, state_dict=lazy, dtype=dtype,
                                        output_loading_info=True, **{**kwargs, **STRICT_REPORT})


def casts(files: list[str], dtype: torch.dtype | None) -> bool:
    """Whether loading in ``dtype`` converts a stored floating-point tensor (reads the headers only)."""
    from safetensors import safe_open

    if dtype is None:
        return False
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for key in handle.keys():
                stored = _STORED_FLOATS.get(handle.get_slice(key).get_dtype())
                if stored is not None and stored != dtype:
                    return True
    return False


def _open(safe_open: Any, path: str, mapped: bool = False) -> Any:
    if mapped:
        return safe_open(path, framework="pt", device="cpu")
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.7 has no backend choice
        logger.info("This safetensors version cannot read tensors one at a time; memory-mapping %s "
                    "(peak memory while loading will be higher).", path)
        return safe_open(path, framework="pt", device="cpu")
