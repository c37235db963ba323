"""LLaVA-NeXT weights: LLaVA's (tower, projector, language model) plus the learned ``image_newline``."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.llava.convert import TOP_LEVEL, convert_llava
from vlm_lens.architectures.llava_next.config import AnyResConfig


def convert_anyres(hf_model: Any, cfg: HookedTransformerConfig, vlm_cfg: AnyResConfig) -> dict[str, torch.Tensor]:
    """LLaVA's converted weights plus ``image_newline``; any other top-level weight is an error."""
    state = convert_llava(hf_model, cfg, vlm_cfg, top_level=(*TOP_LEVEL, "model.image_newline"))
    state["image_newline"] = hf_model.model.image_newline
    return state
