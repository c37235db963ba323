"""Small seeded helpers for the SAE tests (imported by conftest and the test modules)."""

import numpy as np
import torch
from PIL import Image

PROMPTS = ["USER : <image>\nwhat is this ? ASSISTANT :", "USER : describe the <image>\nplease ASSISTANT :"]


def make_sae(hook_name: str, d_in: int, d_sae: int = 24, seed: int = 0, scale: float = 0.3, **cfg):
    """A seeded SAE Lens StandardSAE with random weights (biases included), so its splice changes the output."""
    from sae_lens import StandardSAE, StandardSAEConfig

    config = StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", **cfg)
    config.metadata.hook_name = hook_name
    sae = StandardSAE(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return sae


def rgb(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
