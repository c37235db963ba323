"""A hooked SigLIP vision tower built from TransformerLens components.

Pre-layernorm ViT without a class token and without a pre-layernorm: patch embedding (a convolution
with a bias) plus learned position embeddings, then TransformerLens ``TransformerBlock``s with
bidirectional attention and ``gelu_pytorch_tanh``. Hook names are the CLIP tower's, under ``vision.``
(there is no ``vision.ln_pre``).

SigLIP's ``post_layernorm`` is not part of this tower: the LLaVA family reads
``hidden_states[vision_feature_layer]``, and SigLIP records those before ``post_layernorm`` (even
index -1), so a VLM never uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from vlm_lens.config import VLMConfig
from vlm_lens.vision.vit import HookedViT


class HookedSiglipVision(HookedViT):
    """SigLIP vision transformer up to the deepest feature layer the VLM reads: the shared ViT plus a
    patch-embedding bias (no class token, no ``ln_pre``).

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.llava_next.testing import make_hf, tiny_onevision_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_onevision_config())).vision  # 16-px tiles of 4-px patches
        >>> vision(torch.randn(2, 3, 16, 16)).shape  # [n_tiles, n_patches, d_features]
        torch.Size([2, 16, 24])
    """

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32, drop_class_token: bool = False):
        if cfg.vision.has_class_token:
            raise ValueError("A SigLIP VisionConfig must have has_class_token=False.")
        super().__init__(cfg, dtype, drop_class_token)
        self.b_patch = nn.Parameter(torch.empty(cfg.vision.d_model, dtype=dtype))

    def forward(
        self, pixel_values: Float[torch.Tensor, "n_images channels height width"]
    ) -> Float[torch.Tensor, "n_images n_tokens d_features"]:
        """Selected hidden states (concatenated over feature layers), before the projector."""
        self.check_pixels(pixel_values)
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch,
                     stride=self.vision_cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2).contiguous())  # TL's MLP needs contiguous input
        x = x + self.hook_pos_embed(self.W_pos.expand(x.shape[0], -1, -1))
        return self.selected_hidden_states(x)
