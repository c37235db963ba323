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
from transformer_lens.components import TransformerBlock
from transformer_lens.hook_points import HookPoint

from vlm_lens.config import VLMConfig
from vlm_lens.vision.clip import HookedCLIPVision, vision_block_config


class HookedSiglipVision(nn.Module):
    """SigLIP vision transformer up to the deepest feature layer the VLM reads.

    Example:
        >>> feats = model.vision(pixel_values)  # [n_tiles, n_patches, d_features]  # doctest: +SKIP
    """

    check_pixels = HookedCLIPVision.check_pixels  # same contract: [n, channels, image_size, image_size]

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg = cfg.vision
        if vcfg.has_class_token:
            raise ValueError("A SigLIP VisionConfig must have has_class_token=False.")
        self.vlm_cfg = cfg
        self.vision_cfg = vcfg
        n_built = cfg.n_vision_layers_used
        self.cfg = vision_block_config(vcfg, n_built, dtype)
        d = vcfg.d_model
        self.W_patch = nn.Parameter(
            torch.empty(d, vcfg.n_channels, vcfg.patch_size, vcfg.patch_size, dtype=dtype)
        )
        self.b_patch = nn.Parameter(torch.empty(d, dtype=dtype))
        self.W_pos = nn.Parameter(torch.empty(vcfg.n_positions, d, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_tiles, n_patches, d_vision]
        self.hook_pos_embed = HookPoint()  # [n_tiles, n_patches, d_vision]
        self.blocks = nn.ModuleList([TransformerBlock(self.cfg, i) for i in range(n_built)])

    def forward(
        self, pixel_values: Float[torch.Tensor, "n_images channels height width"]
    ) -> Float[torch.Tensor, "n_images n_tokens d_features"]:
        """Selected hidden states (concatenated over feature layers), before the projector."""
        self.check_pixels(pixel_values)
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch,
                     stride=self.vision_cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2).contiguous())  # TL's MLP needs contiguous input
        x = x + self.hook_pos_embed(self.W_pos.expand(x.shape[0], -1, -1))
        wanted = set(self.vlm_cfg.feature_layers)
        hidden = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 in wanted:
                hidden[i + 1] = x
        selected = [hidden[i] for i in self.vlm_cfg.feature_layers]
        return torch.cat(selected, dim=-1) if len(selected) > 1 else selected[0]
