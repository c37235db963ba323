"""Hooked vision towers shared by several families: a ViT base with CLIP's and SigLIP's variants, and
their config readers and weight converters (``vision.convert``). A family with a tower of its own keeps
it in its folder."""

from __future__ import annotations

from vlm_lens.vision.clip import HookedCLIPVision
from vlm_lens.vision.siglip import HookedSiglipVision

TOWERS = {"clip": HookedCLIPVision, "siglip": HookedSiglipVision}

__all__ = ["TOWERS", "HookedCLIPVision", "HookedSiglipVision"]
