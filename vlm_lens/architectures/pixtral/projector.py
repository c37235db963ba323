"""Mistral 3's multimodal projector: RMSNorm per patch, the patch merger, then LLaVA's two-layer MLP."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens.components import RMSNorm
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint
from transformers.activations import ACT2FN

from vlm_lens.architectures.pixtral.config import Mistral3Config


class Mistral3Projector(nn.Module):
    """``W_out act(W_in (W_merge norm(x)) + b_in) + b_out``, one row per merged block of patches.

    Hooks: ``projector.hook_in`` [n_tokens, merge**2 * d_vision] (the image features, the block's patches
    row-major), ``projector.norm.hook_{scale,normalized}`` [n_tokens, merge**2, ...], ``projector.hook_merged``
    [n_tokens, d_vision] (the patch merger's output), ``projector.hook_hidden`` [n_tokens, d_model] after the
    activation, ``projector.hook_out`` [n_tokens, d_model].
    """

    def __init__(self, cfg: Mistral3Config, d_model: int, vision_cfg: HookedTransformerConfig):
        super().__init__()
        d_vision, dtype = cfg.vision.d_model, vision_cfg.dtype
        self.n_merged = cfg.spatial_merge_size**2
        self.norm = RMSNorm(vision_cfg, length=d_vision)  # shares the tower's config: dtype moves with it
        self.norm.eps = cfg.projector_eps  # transformers uses the text model's rms_norm_eps here
        self.W_merge = nn.Parameter(torch.empty(self.n_merged * d_vision, d_vision, dtype=dtype))
        self.W_in = nn.Parameter(torch.empty(d_vision, d_model, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_model, d_model, dtype=dtype))
        if cfg.projector_bias:
            self.b_in = nn.Parameter(torch.empty(d_model, dtype=dtype))
            self.b_out = nn.Parameter(torch.empty(d_model, dtype=dtype))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        if cfg.projector_act not in ACT2FN:
            raise ValueError(f"Unknown projector activation {cfg.projector_act!r}; known: transformers.activations.ACT2FN.")
        self.act = ACT2FN[cfg.projector_act]
        self.hook_in = HookPoint()
        self.hook_merged = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_out = HookPoint()

    @staticmethod
    def _affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = x @ W
        return y if b is None else y + b

    def forward(self, features: Float[torch.Tensor, "n_tokens d_features"]) -> Float[torch.Tensor, "n_tokens d_model"]:
        x = self.hook_in(features.to(self.W_merge.dtype))
        x = self.norm(x.reshape(len(x), self.n_merged, -1)).reshape(len(x), -1)
        merged = self.hook_merged(x @ self.W_merge)
        hidden = self.hook_hidden(self.act(self._affine(merged, self.W_in, self.b_in)))
        return self.hook_out(self._affine(hidden, self.W_out, self.b_out))
