"""Idefics3's projector: the connector's ``modality_projection``, one linear map without bias.

The connector's pixel shuffle runs at the end of the tower (``vision.pixel_shuffle``), so
``hook_image_features`` and ``projector.hook_in`` hold one row per language-model token, as for the other
families.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint


class Idefics3Projector(nn.Module):
    """``x @ W_proj``. Hooks: ``projector.hook_in`` [n_tiles, tokens_per_tile, scale**2 * d_vision] and
    ``projector.hook_out`` [n_tiles, tokens_per_tile, d_model] (a single linear map has no hidden stage)."""

    def __init__(self, d_in: int, d_model: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.W_proj = nn.Parameter(torch.empty(d_in, d_model, dtype=dtype))
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_tiles n_tokens d_features"]
                ) -> Float[torch.Tensor, "n_tiles n_tokens d_model"]:
        x = self.hook_in(features.to(self.W_proj.dtype))
        return self.hook_out(x @ self.W_proj)
