"""A hooked CLIP vision tower built from TransformerLens components.

Pre-layernorm ViT with a class token and learned position embeddings (the shared part is
``vit.HookedViT``). The blocks are TransformerLens ``TransformerBlock``s with bidirectional attention,
so every hook name inside a block is the one TransformerLens users know, under the ``vision.`` prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.components import LayerNorm

from vlm_lens.config import VLMConfig
from vlm_lens.vision.vit import HookedViT


class HookedCLIPVision(HookedViT):
    """CLIP vision transformer up to the deepest feature layer the VLM reads: the shared ViT plus a
    class token and ``ln_pre``.

    Example:
        >>> model.vision(inputs.pixel_values).shape  # [n_images, n_patches, d_features]: 3x3 patches, no CLS
        torch.Size([1, 9, 64])
    """

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32, drop_class_token: bool = False):
        super().__init__(cfg, dtype, drop_class_token)
        self.class_embedding = nn.Parameter(torch.empty(cfg.vision.d_model, dtype=dtype))
        self.ln_pre = LayerNorm(self.cfg)

    def forward(
        self, pixel_values: Float[torch.Tensor, "n_images channels height width"]
    ) -> Float[torch.Tensor, "n_images n_tokens d_features"]:
        """Selected hidden states (concatenated over feature layers), before the projector."""
        self.check_pixels(pixel_values)
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, stride=self.vision_cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2))
        n = x.shape[0]
        if self.vision_cfg.has_class_token:
            x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1)
        x = x + self.hook_pos_embed(self.W_pos.expand(n, -1, -1))
        x = self.ln_pre(x)
        return self.selected_hidden_states(x)
