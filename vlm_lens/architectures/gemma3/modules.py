"""Gemma 3's tower and projector, hooked.

- ``HookedGemma3Vision``: the shared SigLIP tower (``vlm_lens.vision.HookedSiglipVision``) plus its final
  layernorm (``vision.ln_final``), because Gemma 3 reads SigLIP's ``last_hidden_state``, which is normed
  (the LLaVA line reads a hidden state before it).
- ``Gemma3Projector``: transformers' ``Gemma3MultiModalProjector``: the patch grid is average-pooled to
  ``mm_tokens_per_image`` tokens, RMS-normed (Gemma's norm, its ``1 + w`` folded into ``ln.w`` as
  TransformerLens does for Gemma) and projected by one matrix into the language model's space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.components import LayerNorm, RMSNorm
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.architectures.gemma3.config import Gemma3Config
from vlm_lens.config import VLMConfig
from vlm_lens.vision import HookedSiglipVision


class HookedGemma3Vision(HookedSiglipVision):
    """SigLIP patches -> blocks -> ``ln_final`` (hooks ``vision.ln_final.hook_scale`` / ``hook_normalized``)."""

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32):  # also PaliGemma's tower
        super().__init__(cfg, dtype)
        self.ln_final = LayerNorm(self.cfg)

    def forward(self, pixel_values: Float[torch.Tensor, "n_images channels height width"]
                ) -> Float[torch.Tensor, "n_images n_patches d_vision"]:
        return self.ln_final(super().forward(pixel_values))


class Gemma3Projector(nn.Module):
    """Average pooling, RMSNorm, projection.

    Hooks: ``projector.hook_in`` [n_images, n_patches, d_vision] (the image features), ``projector.hook_hidden``
    [n_images, n_tokens, d_vision] (pooled), ``projector.ln.hook_scale`` / ``hook_normalized``,
    ``projector.hook_out`` [n_images, n_tokens, d_model]. Tokens are row-major over the pooled grid.
    """

    def __init__(self, cfg: Gemma3Config, d_model: int, vision_cfg: HookedTransformerConfig):
        super().__init__()
        self.side, self.pool = cfg.vision.grid_size, cfg.pool_size
        self.ln = RMSNorm(vision_cfg, length=cfg.vision.d_model)  # HF uses the tower's layer_norm_eps here
        self.W_out = nn.Parameter(torch.empty(cfg.vision.d_model, d_model, dtype=vision_cfg.dtype))
        self.hook_in = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_images n_patches d_vision"]
                ) -> Float[torch.Tensor, "n_images n_tokens d_model"]:
        x = self.hook_in(features.to(self.W_out.dtype))
        grid = x.transpose(1, 2).reshape(len(x), x.shape[-1], self.side, self.side)
        pooled = self.hook_hidden(F.avg_pool2d(grid, self.pool, self.pool).flatten(2).transpose(1, 2))
        return self.hook_out(self.ln(pooled) @ self.W_out)
