"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA's modules plus any-resolution tiling and the
learned ``image_newline``; a CLIP or SigLIP tower and a Llama-family language model.

The weights are LLaVA's (tower, projector, language model) plus ``image_newline``; the tiling lives in
``vlm_lens.pipelines_anyres``, chosen through ``VLMConfig.pipeline``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.config import VLMConfig
from vlm_lens.conversion.llava import convert_llava, llava_configs
from vlm_lens.conversion.registry import ArchitectureSpec, register

_TOP_LEVEL = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.",
              "model.image_newline", "lm_head.")


def anyres_configs(hf_config: Any, dtype: torch.dtype, device: str, *, architecture: str, pipeline: str,
                   vision_aspect_ratio: str | None = None) -> tuple[HookedTransformerConfig, VLMConfig]:
    """LLaVA's configs plus the any-resolution fields (shared by LLaVA-NeXT and LLaVA-OneVision)."""
    cfg, vlm_cfg = llava_configs(hf_config, dtype, device)
    pinpoints = tuple(tuple(int(side) for side in p) for p in hf_config.image_grid_pinpoints)
    return cfg, replace(vlm_cfg, architecture=architecture, pipeline=pipeline, image_newline=True,
                        image_grid_pinpoints=pinpoints, vision_aspect_ratio=vision_aspect_ratio)


def llava_next_configs(hf_config: Any, dtype: torch.dtype, device: str) -> tuple[HookedTransformerConfig, VLMConfig]:
    return anyres_configs(hf_config, dtype, device, architecture="LlavaNextForConditionalGeneration",
                          pipeline="anyres")


def convert_anyres(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: VLMConfig) -> dict[str, torch.Tensor]:
    """LLaVA's converted weights plus ``image_newline``; any other top-level weight is an error."""
    unknown = [name for name, _ in hf_model.named_parameters() if not name.startswith(_TOP_LEVEL)]
    if unknown:
        raise ValueError(f"{type(hf_model).__name__} has weights vlm_lens does not convert: {unknown[:12]}. "
                         "This checkpoint variant is not supported; loading stops rather than ignore them.")
    state = convert_llava(hf_model, cfg, vlm_cfg)
    state["image_newline"] = hf_model.model.image_newline
    return state


def _hf_class():
    from transformers import LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration


LLAVA_NEXT = register(
    ArchitectureSpec(
        name="LlavaNextForConditionalGeneration",
        hf_class=_hf_class,
        build_configs=llava_next_configs,
        convert_weights=convert_anyres,
    )
)
