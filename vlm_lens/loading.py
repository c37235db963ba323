"""Loading HF checkpoints into a HookedVLM: strict, and never two full copies of the weights at once.

The HF model is converted into a state dict of views of its tensors; then the HF model is dropped,
LM weights are processed one tensor at a time (TransformerLens's ProcessWeights), and each tensor is
assigned into a HookedVLM whose parameters were allocated but never written (so never resident).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformer_lens.weight_processing import ProcessWeights

from vlm_lens.conversion import architecture_of, get_spec
from vlm_lens.conversion.checks import require_exact_keys

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_FOLDED_NORMS = (".ln1.w", ".ln2.w", "ln_final.w")
# Only the language model's own weights go through TransformerLens's processing (vision tower,
# projector and extras such as LLaVA-NeXT's image_newline are left as they are).
_LM_PREFIXES = ("embed.", "pos_embed.", "blocks.", "ln_final.", "unembed.")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or a torch.dtype.")
    return _DTYPES[dtype]


def load_pretrained(cls: type, name_or_path: str, *, device: Any, dtype: Any, processing: dict[str, bool],
                    allow_pickle: bool, **hf_kwargs: Any) -> Any:
    from transformers import AutoConfig

    dtype = resolve_dtype(dtype)
    hf_kwargs.pop("trust_remote_code", None)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **hf_kwargs)
    spec = get_spec(architecture_of(config))
    try:
        hf_model, info = spec.hf_class().from_pretrained(
            name_or_path, dtype=dtype, use_safetensors=None if allow_pickle else True,
            output_loading_info=True, trust_remote_code=False, **hf_kwargs,
        )
    except OSError as err:
        hint = "" if allow_pickle else (" If the checkpoint has only pickle (.bin) weights and you trust it, "
                                       "pass allow_pickle=True.")
        raise ValueError(f"Could not load weights from {name_or_path!r}: {err}.{hint}") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        detail = "; ".join(f"{k.replace('_', ' ')}: {sorted(map(str, v))[:12]}" for k, v in problems.items())
        raise ValueError(
            f"Checkpoint {name_or_path!r} does not match its config ({detail}). vlm_lens never fills "
            "missing weights; fix or re-save the checkpoint."
        )
    processor = _load_processor(name_or_path, spec.load_processor, **hf_kwargs)
    holder = [hf_model]
    del hf_model
    return build_from_hf(cls, holder, processor, processing=processing, device=device, dtype=dtype)


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
                  device: Any = None, dtype: Any = None) -> Any:
    """Convert an HF model. ``hf_model`` may be a one-element list, which is emptied to free it early."""
    holder = hf_model if isinstance(hf_model, list) else [hf_model]
    model = holder[0]
    dtype = resolve_dtype(dtype) or next(model.parameters()).dtype
    device = device or next(model.parameters()).device
    spec = get_spec(architecture_of(model.config) or type(model).__name__)
    cfg, vlm_cfg = spec.build_configs(model.config, dtype, str(device))
    state = spec.convert_weights(model, cfg, vlm_cfg)
    del model
    holder.clear()  # from_pretrained's HF model is now only referenced through `state`
    if any(processing.values()):
        state = _process_language_weights(state, cfg, processing)
    tokenizer = getattr(processor, "tokenizer", None)
    vlm = cls(cfg, vlm_cfg, tokenizer=tokenizer, processor=processor, move_to_device=False)
    assign_state(vlm, state, dtype)
    vlm.to(torch.device(device) if not isinstance(device, torch.device) else device)
    vlm.eval()
    return vlm


def _process_language_weights(state: dict[str, torch.Tensor], cfg: Any, steps: dict[str, bool]) -> dict:
    lm = {k: v for k, v in state.items() if k.startswith(_LM_PREFIXES)}
    other = {k: v for k, v in state.items() if k not in lm}
    state.clear()
    lm = ProcessWeights.process_weights(lm, cfg, **steps)
    if steps.get("fold_ln"):
        cfg.normalization_type = "RMSPre" if cfg.normalization_type == "RMS" else "LNPre"
        for key in [k for k in lm if k.endswith(_FOLDED_NORMS)]:
            if not torch.all(lm[key] == 1):
                raise ValueError(f"{key} was not folded into the following weights; cannot drop it.")
            del lm[key]
    lm.update(other)
    return lm


def assign_state(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Strictly check names and shapes, then move each tensor into the model (no second copy)."""
    params = dict(model.named_parameters())
    require_exact_keys(state.keys(), params.keys(), "HookedVLM",
                       hint="This is a converter bug or an unsupported checkpoint variant.")
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(p.shape)}"
           for k, p in params.items() if state[k].shape != p.shape]
    if bad:
        raise ValueError("Weight shapes do not match the config:\n" + "\n".join(bad[:12]))
    for key in list(state):
        module_path, _, name = key.rpartition(".")
        module = model.get_submodule(module_path)
        tensor = state.pop(key).detach().to(dtype).contiguous()
        module._parameters[name] = nn.Parameter(tensor, requires_grad=params[key].requires_grad)
