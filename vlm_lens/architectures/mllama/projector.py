"""Mllama's projector: one linear layer from the tower's features to the language model's width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint


class MllamaProjector(nn.Module):
    """``x @ W + b``. Hooks: ``projector.hook_in`` (the features), ``projector.hook_out`` [n_images, keys, d_model]:
    what every cross-attention layer reads (the keys' and values' input)."""

    def __init__(self, d_in: int, d_model: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.W = nn.Parameter(torch.empty(d_in, d_model, dtype=dtype))
        self.b = nn.Parameter(torch.empty(d_model, dtype=dtype))
        self.hook_in, self.hook_out = HookPoint(), HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_images keys d_features"]
                ) -> Float[torch.Tensor, "n_images keys d_model"]:
        # HF's nn.Linear call: the bias added inside the product, one rounding in half precision
        return self.hook_out(F.linear(self.hook_in(features.to(self.W.dtype)), self.W.T, self.b))
