"""Hooked vision encoders, one module per family, chosen by ``VisionConfig.family``."""

from __future__ import annotations

from torch import nn

from vlm_lens.config import VLMConfig
from vlm_lens.vision.clip import HookedCLIPVision

_FAMILIES = {"clip": HookedCLIPVision}


def build_vision_tower(cfg: VLMConfig, dtype) -> nn.Module:
    return _FAMILIES[cfg.vision.family](cfg, dtype=dtype)


__all__ = ["HookedCLIPVision", "build_vision_tower"]
