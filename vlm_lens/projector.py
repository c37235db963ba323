"""Hooked multimodal projectors shared by several families (vision features -> language-model embeddings)."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN


class LlavaProjector(nn.Module):
    """LLaVA's two-layer MLP: ``W_out @ act(W_in @ x + b_in) + b_out``; biases optional.

    Hooks: ``projector.hook_in`` (image features), ``projector.hook_hidden`` (after the activation),
    ``projector.hook_out`` (image embeddings in the LM's space).
    """

    def __init__(self, d_in: int, d_model: int, act: str, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(d_in, d_model, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_model, d_model, dtype=dtype))
        if bias:
            self.b_in = nn.Parameter(torch.empty(d_model, dtype=dtype))
            self.b_out = nn.Parameter(torch.empty(d_model, dtype=dtype))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        if act not in ACT2FN:
            raise ValueError(f"Unknown projector activation {act!r}; known: see transformers.activations.ACT2FN.")
        self.act = ACT2FN[act]
        # [n_images, n_tokens, ...], or [total_image_tokens, ...] where images differ in size (a tower of variable size)
        self.hook_in = HookPoint()  # [..., d_features]
        self.hook_hidden = HookPoint()  # [..., d_model]
        self.hook_out = HookPoint()  # [..., d_model]

    @staticmethod
    def _affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ W
        return y if b is None else y + b

    def forward(
        self, features: Float[torch.Tensor, "*tokens d_features"]
    ) -> Float[torch.Tensor, "*tokens d_model"]:
        x = self.hook_in(features.to(self.W_in.dtype))
        hidden = self.hook_hidden(self.act(self._affine(x, self.W_in, self.b_in)))
        return self.hook_out(self._affine(hidden, self.W_out, self.b_out))
