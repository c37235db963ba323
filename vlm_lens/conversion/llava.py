"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower + 2-layer projector + Llama-family LM."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.config import VLMConfig, normalise_feature_layers
from vlm_lens.conversion.checks import require_exact_keys
from vlm_lens.conversion.clip import clip_vision_config, convert_clip_vision
from vlm_lens.conversion.language import convert_language_model, text_config_to_tl
from vlm_lens.conversion.registry import ArchitectureSpec, register
from vlm_lens.conversion.siglip import convert_siglip_vision, siglip_vision_config

# The vision tower family is chosen from ``vision_config.model_type``; LLaVA-NeXT/OneVision reuse these.
VISION_CONFIGS = {"clip_vision_model": clip_vision_config, "siglip_vision_model": siglip_vision_config}
VISION_CONVERTERS = {"clip": convert_clip_vision, "siglip": convert_siglip_vision}


def _vision_config(hf_vision: Any):
    model_type = getattr(hf_vision, "model_type", None)
    if model_type not in VISION_CONFIGS:
        raise ValueError(
            f"Unsupported vision tower {model_type!r}; supported: {', '.join(sorted(VISION_CONFIGS))}."
        )
    return VISION_CONFIGS[model_type](hf_vision)


def llava_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, VLMConfig]:
    vision = _vision_config(hf_config.vision_config)
    vlm_cfg = VLMConfig(
        architecture="LlavaForConditionalGeneration",
        vision=vision,
        feature_layers=normalise_feature_layers(hf_config.vision_feature_layer, vision.n_layers),
        select_strategy=hf_config.vision_feature_select_strategy,
        image_token_id=hf_config.image_token_id,
        projector_act=hf_config.projector_hidden_act,
        projector_bias=getattr(hf_config, "multimodal_projector_bias", True),
    )
    return text_config_to_tl(hf_config.text_config, dtype, device), vlm_cfg


def convert_llava_projector(projector: torch.nn.Module, cfg: VLMConfig) -> dict[str, torch.Tensor]:
    sd = dict(projector.named_parameters())
    names = {"linear_1.weight", "linear_2.weight"}
    if cfg.projector_bias:
        names |= {"linear_1.bias", "linear_2.bias"}
    require_exact_keys(sd.keys(), names, "LLaVA projector")
    out = {"projector.W_in": sd["linear_1.weight"].T, "projector.W_out": sd["linear_2.weight"].T}
    if cfg.projector_bias:
        out["projector.b_in"], out["projector.b_out"] = sd["linear_1.bias"], sd["linear_2.bias"]
    return out


def convert_llava(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: VLMConfig) -> dict[str, torch.Tensor]:
    inner = hf_model.model
    state = convert_language_model(inner.language_model, hf_model.lm_head, hf_model.config.text_config, cfg)
    state.update(VISION_CONVERTERS[vlm_cfg.vision.family](_unwrap_tower(inner.vision_tower), vlm_cfg))
    state.update(convert_llava_projector(inner.multi_modal_projector, vlm_cfg))
    return state


def _hf_class():
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


LLAVA = register(
    ArchitectureSpec(
        name="LlavaForConditionalGeneration",
        hf_class=_hf_class,
        build_configs=llava_configs,
        convert_weights=convert_llava,
    )
)


def _unwrap_tower(tower: torch.nn.Module) -> torch.nn.Module:
    """transformers < 5.x wraps the CLIP transformer in ``.vision_model``; newer versions do not."""
    return getattr(tower, "vision_model", tower)
