"""InternVL's projector (``InternVLMultiModalProjector``): LayerNorm, then a two-layer MLP.

The pixel shuffle runs at the end of the tower (``vision``), so ``hook_image_features`` and ``projector.hook_in``
hold one row per language-model token, as for the other families.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens.components import LayerNorm
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.projector import LlavaProjector

PROJECTOR_EPS = 1e-5  # HF's nn.LayerNorm default, whatever the tower's eps


class InternVLProjector(LlavaProjector):
    """``W_out act(W_in ln(x) + b_in) + b_out``.

    Hooks: ``projector.hook_in`` [n_tiles, tokens_per_tile, scale**2 * d_vision] (the image features),
    ``projector.ln.hook_scale`` / ``projector.ln.hook_normalized``, ``projector.hook_hidden`` (after the
    activation) and ``projector.hook_out`` [n_tiles, tokens_per_tile, d_model].
    """

    def __init__(self, d_in: int, d_model: int, act: str, vision_cfg: HookedTransformerConfig):
        super().__init__(d_in, d_model, act, bias=True, dtype=vision_cfg.dtype)
        self.ln = LayerNorm(vision_cfg, length=d_in)  # shares the tower's config: dtype moves with it
        self.ln.eps = PROJECTOR_EPS

    def forward(self, features: Float[torch.Tensor, "n_tiles n_tokens d_features"]
                ) -> Float[torch.Tensor, "n_tiles n_tokens d_model"]:
        x = self.ln(self.hook_in(features.to(self.W_in.dtype)))
        hidden = self.hook_hidden(self.act(self._affine(x, self.W_in, self.b_in)))
        return self.hook_out(self._affine(hidden, self.W_out, self.b_out))
