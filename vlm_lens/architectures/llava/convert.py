"""LLaVA-1.5 weights: a CLIP, SigLIP or Pixtral tower, the two-layer projector and a Llama-family LM."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.checks import require_exact_keys, require_known_prefixes
from vlm_lens.architectures.language import convert_language_model
from vlm_lens.architectures.llava.config import LlavaConfig
from vlm_lens.architectures.pixtral.convert import convert_pixtral_vision
from vlm_lens.vision.convert import convert_clip_vision, convert_siglip_vision

VISION_CONVERTERS = {"clip": convert_clip_vision, "siglip": convert_siglip_vision, "pixtral": convert_pixtral_vision}
TOP_LEVEL = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")


def convert_llava_projector(projector: torch.nn.Module, cfg: LlavaConfig) -> dict[str, torch.Tensor]:
    sd = dict(projector.named_parameters())
    names = {"linear_1.weight", "linear_2.weight"}
    if cfg.projector_bias:
        names |= {"linear_1.bias", "linear_2.bias"}
    require_exact_keys(sd.keys(), names, "LLaVA projector")
    out = {"projector.W_in": sd["linear_1.weight"].T, "projector.W_out": sd["linear_2.weight"].T}
    if cfg.projector_bias:
        out["projector.b_in"], out["projector.b_out"] = sd["linear_1.bias"], sd["linear_2.bias"]
    return out


def convert_llava(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: LlavaConfig,
                  top_level: tuple[str, ...] = TOP_LEVEL) -> dict[str, torch.Tensor]:
    """LM, tower and projector; any weight outside ``top_level`` is an error (never silently dropped)."""
    require_known_prefixes(hf_model, top_level)
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, hf_model.config.text_config, cfg)
    state.update(VISION_CONVERTERS[vlm_cfg.vision.family](_unwrap_tower(inner.vision_tower), vlm_cfg))
    state.update(convert_llava_projector(inner.multi_modal_projector, vlm_cfg))
    return state


def _unwrap_tower(tower: torch.nn.Module) -> torch.nn.Module:
    """transformers < 5.x wraps the CLIP transformer in ``.vision_model``; newer versions do not."""
    return getattr(tower, "vision_model", tower)
