"""Finding a checkpoint's safetensors files and reading them one tensor at a time.

Hugging Face's loader memory-maps safetensors files. The mapped pages of the whole file stay resident
until every tensor of the file is freed, so a converter that makes its own copies (TransformerLens's
layout, folded norms) holds the checkpoint twice. Reading each tensor into its own buffer (safetensors'
``pread`` backend) lets the loader free a block's source weights as soon as that block is converted.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from typing import Any

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# from_pretrained keyword arguments that say where the files are (hub ids and local folders alike).
# Mis-shaped weights listed in transformers' loading report (which the caller turns into an error
# naming them) instead of a RuntimeError whose details only reach the log.
STRICT_REPORT = {"ignore_mismatched_sizes": True}
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


def load_hf_model(hf_class: type, config: Any, files: list[str], dtype: Any, *, device: Any = "cpu",
                  mapped: bool = False, **kwargs: Any) -> tuple[Any, dict]:
    """``hf_class.from_pretrained`` on the given safetensors files, each tensor placed on ``device`` as it is
    read (transformers builds the model on the meta device first and materialises one weight at a time).

    ``mapped=False`` reads each tensor into its own memory (safetensors' ``pread`` backend), so a converter
    that copies (weight processing) can free each source as it goes; ``mapped=True`` memory-maps the file
    as transformers does: CPU weights stay views of the file, read on first use (no copy at all when the
    layout is kept, e.g. without processing). On another device, the host holds only the tensors in
    flight. transformers still applies its key renaming, dtype casts and missing/unexpected-key report;
    only the reading is ours. Returns the model and transformers' loading info.
    """
    from safetensors import safe_open

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


def _open(safe_open: Any, path: str, mapped: bool = False) -> Any:
    if mapped:
        return safe_open(path, framework="pt", device="cpu")
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors < 0.7 has no backend choice
        logger.info("This safetensors version cannot read tensors one at a time; memory-mapping %s "
                    "(peak memory while loading will be higher).", path)
        return safe_open(path, framework="pt", device="cpu")
