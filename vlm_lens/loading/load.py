"""Loading HF checkpoints into a HookedVLM: strict, and never two full copies of the weights at once.

transformers builds the HF model from safetensors, memory-mapped (or read one tensor at a time where loading
casts; ``loading/checkpoint.py``); the model is converted into a state dict of views of its tensors and
dropped; then the weights move into a HookedVLM whose parameters were allocated but never written (so never
resident): vision and projector tensors one at a time, language-model weights one block at a time through
weight processing (``_tl/processing.py``: in place for RMS-normed models, so only the weights that change are
written, once). Each source tensor is freed as soon as it has moved, so the peak is about one copy of the
weights plus one block (benchmarks/results/ has the measured figures).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from vlm_lens._memory import Trimmer, release_freed_memory
from vlm_lens._tl.processing import folded_config, process_group, require_supported
from vlm_lens._tl.weights import set_parameter
from vlm_lens.architectures.checks import require_exact_keys
from vlm_lens.architectures.registry import architecture_of, get_spec
from vlm_lens.loading.checkpoint import (
    SAFE_INDEX,
    SAFE_WEIGHTS,
    STRICT_REPORT,
    load_generation_config,
    load_hf_model,
    safetensors_files,
)
from vlm_lens.loading.weights import LM_PREFIXES, drain, lm_groups, processed_keys, shared_memory_keys

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[dtype]


def load_pretrained(cls: type, name_or_path: str, *, device: Any, dtype: Any, processing: dict[str, bool],
                    allow_pickle: bool, fast: bool | None = None, **hf_kwargs: Any) -> Any:
    from transformers import AutoConfig

    dtype = _dtype_argument(dtype, hf_kwargs.pop("torch_dtype", None))
    padding_side = hf_kwargs.pop("default_padding_side", None)
    if padding_side not in (None, "left", "right"):
        raise ValueError(f"default_padding_side={padding_side!r}; use 'left' or 'right'.")
    unsupported = sorted(set(hf_kwargs) & set(TRANSFORMER_LENS_ONLY))
    if unsupported:
        raise ValueError(f"from_pretrained does not take TransformerLens's {unsupported}: a HookedVLM loads every "
                         "layer onto one device (device=...); load the model, then change it.")
    hf_kwargs.pop("trust_remote_code", None)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **hf_kwargs)
    spec = get_spec(architecture_of(config), getattr(config, "model_type", None))
    try:
        files = safetensors_files(name_or_path, **hf_kwargs)
        if files is not None:
            hf_model, info = load_hf_model(spec.hf_class(), config, files, dtype, device=device, **hf_kwargs)
            generation = load_generation_config(name_or_path, **hf_kwargs)
            if generation is not None:  # as HF's own from_pretrained of the folder has it
                hf_model.generation_config = generation
        elif allow_pickle:
            hf_model, info = spec.hf_class().from_pretrained(
                name_or_path, dtype=dtype, use_safetensors=False, output_loading_info=True,
                trust_remote_code=False, **{**hf_kwargs, **STRICT_REPORT},
            )
        else:
            raise ValueError(
                f"{name_or_path!r} has no safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX}). If the "
                "checkpoint has only pickle (.bin) weights and you trust it, pass allow_pickle=True."
            )
    except OSError as err:
        raise ValueError(f"Could not load weights from {name_or_path!r}: {err}.") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(_describe, v))[:12]}" for k, v in problems.items())
        raise ValueError(
            f"Checkpoint {name_or_path!r} does not match its config ({detail}). vlm_lens never fills "
            "missing weights; fix or re-save the checkpoint."
        )
    processor = _load_processor(name_or_path, spec.load_processor, **hf_kwargs)
    holder = [hf_model]
    del hf_model
    model = build_from_hf(cls, holder, processor, processing=processing, device=device, dtype=dtype, fast=fast)
    if padding_side is not None and model.tokenizer is not None:
        model.set_tokenizer(model.tokenizer, default_padding_side=padding_side)
    return model


# HookedTransformer.from_pretrained options with no meaning here; refused by name rather than passed on to
# the HF constructor, whose error would not say what to do.
TRANSFORMER_LENS_ONLY = ("n_devices", "first_n_layers", "move_to_device", "refactor_factored_attn_matrices",
                         "checkpoint_index", "checkpoint_value", "hf_model", "tokenizer", "n_ctx")


def _dtype_argument(dtype: Any, torch_dtype: Any) -> torch.dtype | None:
    """``dtype``, or ``torch_dtype`` (its old name, which TransformerLens still takes and lets win)."""
    if torch_dtype is None:
        return resolve_dtype(dtype)
    torch_dtype = resolve_dtype(torch_dtype)
    if dtype is not None and resolve_dtype(dtype) not in (torch.float32, torch_dtype):
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass dtype= alone.")
    warnings.warn("torch_dtype= is the old name of dtype=; use dtype=.", DeprecationWarning, stacklevel=4)
    return torch_dtype


def _describe(entry: Any) -> str:
    """A loading-report entry: a key, or (key, checkpoint shape, model shape) for a mis-shaped weight."""
    if isinstance(entry, tuple) and len(entry) == 3:
        key, found, expected = entry
        return f"{key}: checkpoint {tuple(found)} vs config {tuple(expected)}"
    return str(entry)


def _load_processor(name_or_path: str, load: Any = None, **hf_kwargs: Any) -> Any:
    from transformers import AutoProcessor

    load = load or AutoProcessor.from_pretrained  # an architecture may register its own loader
    try:
        return load(name_or_path, trust_remote_code=False, **hf_kwargs)
    except (OSError, ValueError, TypeError, ImportError) as err:
        logger.warning("No processor loaded for %s (%s); model.prepare() will not be available.",
                       name_or_path, err)
        return None


def build_from_hf(cls: type, hf_model: Any, processor: Any, *, processing: dict[str, bool],
                  device: Any = None, dtype: Any = None, fast: bool | None = None) -> Any:
    """Convert an HF model. ``hf_model`` may be a one-element list, which is emptied to free it early.

    Weights move into the HookedVLM one tensor at a time (vision, projector) or one group at a time
    (language model: embedding, each block's attention and MLP, unembedding, which processing writes into;
    a model passed in, not in a list, is the caller's: what processing writes is copied first); each source
    tensor is released once it has been moved.
    """
    holder = hf_model if isinstance(hf_model, list) else [hf_model]
    model = holder[0]
    generation_config = getattr(model, "generation_config", None)
    dtype = resolve_dtype(dtype) or next(model.parameters()).dtype
    device = device or next(model.parameters()).device
    spec = get_spec(architecture_of(model.config) or type(model).__name__, getattr(model.config, "model_type", None))
    cfg, vlm_cfg = spec.build_configs(model.config, dtype, str(device))
    with torch.no_grad():  # views without autograd graphs, which would keep HF's parameters alive
        state = {k: v.detach() for k, v in spec.convert_weights(model, cfg, vlm_cfg).items()}
    if isinstance(hf_model, list):  # ours (from_pretrained): its tensors are now only referenced by `state`
        _drop_tensors(model)  # modules can sit in reference cycles; cheaper than gc.collect() on a big heap
    del model
    holder.clear()
    if processing.get("center_unembed") and (cfg.output_logits_soft_cap or 0) > 0:
        # as TransformerLens does: a soft cap on the logits is not invariant to adding a constant to them
        logger.warning("center_unembed is off for %s: its logits are soft-capped.", spec.name)
        processing = {**processing, "center_unembed": False}
    process = any(processing.values())
    if process:
        require_supported(cfg)
    fold = bool(processing.get("fold_ln"))
    tokenizer = getattr(processor, "tokenizer", None)
    vlm = cls(folded_config(cfg) if fold else cfg, vlm_cfg, tokenizer=tokenizer, processor=processor,
              move_to_device=False, fast=fast)
    vlm.generation_eos_token_ids, vlm.generation_pad_token_id = generation_token_ids(generation_config)
    params = _check_state(vlm, state, processed_keys(state, fold))
    # Processing writes into the weights: those of a model we were handed, and those sharing memory with
    # another weight (tied embeddings), are copied first.
    if not process:
        copy_first: set[str] = set()
    elif isinstance(hf_model, list):  # ours
        copy_first = shared_memory_keys(state)
    else:
        copy_first = set(state)
    trimmer = Trimmer(sum(p.numel() * p.element_size() for p in params.values()) // 50)
    for key in [k for k in state if not k.startswith(LM_PREFIXES)]:
        trimmer.freed(_assign(vlm, params, key, state.pop(key), dtype))
    with torch.no_grad(), _one_cpu_thread() if process else nullcontext():
        for name, keys in lm_groups(list(state)):
            part = {k: state.pop(k) for k in keys}
            if process:
                part = process_group(name, part, cfg, processing, copy_first)
            for key, tensor in drain(part):
                trimmer.freed(_assign(vlm, params, key, tensor, dtype))
    release_freed_memory()
    vlm.to(torch.device(device) if not isinstance(device, torch.device) else device)
    vlm.eval()
    return vlm


def generation_token_ids(generation_config: Any) -> tuple[tuple[int, ...] | None, int | None]:
    """The stop tokens (one or several) and the pad token of an HF ``GenerationConfig``, or Nones."""
    eos = getattr(generation_config, "eos_token_id", None)
    pad = getattr(generation_config, "pad_token_id", None)
    eos = None if eos is None else tuple(int(t) for t in ([eos] if isinstance(eos, int) else eos))
    return eos or None, None if pad is None else int(pad)


@contextmanager
def _one_cpu_thread() -> Iterator[None]:
    """torch's CPU ops on one thread, for the duration. Processing is a few dozen short memory-bound ops
    (mostly page faults): on a busy machine each op otherwise waits at torch's thread barrier for a
    scheduler time slice (on the 2-core benchmark machine, 16 ms for one fold of a 4 MB weight against
    0.1 ms on one thread, and 0.8 s against 0.3 s for processing the benchmark model). GPU ops are
    unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _drop_tensors(model: nn.Module) -> None:
    """Forget every parameter and buffer of ``model``, so each tensor lives only as long as its views."""
    for module in model.modules():
        module._parameters.clear()
        module._buffers.clear()


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], final_keys: set[str]) -> dict[str, nn.Parameter]:
    """Strictly check names and shapes before anything moves (processing keeps shapes, drops norms)."""
    params = dict(model.named_parameters())
    require_exact_keys(final_keys, params.keys(), "HookedVLM",
                       hint="This is a converter bug or an unsupported checkpoint variant.")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
           for k, p in params.items() if state[k].shape != p.shape]
    if bad:
        raise ValueError("Weight shapes do not match the config:\n" + "\n".join(bad[:12]))
    return params


def _assign(model: nn.Module, params: dict[str, nn.Parameter], key: str, tensor: torch.Tensor,
            dtype: torch.dtype) -> int:
    """Move one tensor into the model, replacing a parameter that was allocated but never written.

    Returns the bytes of the moved tensor (its source is freed when the caller drops it)."""
    module_path, _, name = key.rpartition(".")
    placeholder = params.pop(key)  # dropped with this call, so it can be freed too
    tensor = tensor.detach().to(dtype)  # keeps its strides: a transposed view of HF's layout stays one
    set_parameter(model.get_submodule(module_path), name, tensor, placeholder.requires_grad)
    return tensor.numel() * tensor.element_size()

