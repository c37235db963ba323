"""Hooked vision encoders, one module per family, chosen by ``VisionConfig.family``."""

from __future__ import annotations

from torch import nn

from vlm_lens.config import VLMConfig
from vlm_lens.vision.clip import HookedCLIPVision
from vlm_lens.vision.qwen2_5_vl import HookedQwen2_5_VLVision
from vlm_lens.vision.siglip import HookedSiglipVision

_FAMILIES = {"clip": HookedCLIPVision, "siglip": HookedSiglipVision, "qwen2_5_vl": HookedQwen2_5_VLVision}


def build_vision_tower(cfg: VLMConfig, dtype) -> nn.Module:
    return _FAMILIES[cfg.vision.family](cfg, dtype=dtype)


__all__ = ["HookedCLIPVision", "HookedQwen2_5_VLVision", "HookedSiglipVision", "build_vision_tower"]
