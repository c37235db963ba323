"""InternVL's vision tower (``InternVLVisionModel``, InternViT), hooked, and the pixel shuffle after it.

A pre-norm ViT run on every tile (crop or thumbnail) of every image:

- patch embedding (a convolution with a bias), a CLS token and learned position embeddings (tiles always have
  the tower's ``image_size``, so HF never interpolates them);
- TransformerLens blocks with bidirectional attention and LayerNorm or RMSNorm (``norm_type``), and where the
  checkpoint has it (InternViT-6B) an RMSNorm over all heads' queries and keys (``attn.q_norm`` / ``attn.k_norm``,
  after ``hook_q`` / ``hook_k`` as in TransformerLens's own qk-norm). InternViT's layer
  scale (``lambda_1``, ``lambda_2``) is folded into the attention output and MLP output weights when the weights
  are converted (``convert``): ``hook_attn_out`` and ``hook_mlp_out`` are what each sub-layer adds to the
  residual stream, and ``attn.hook_result`` / ``W_O`` include the scale, so they sum to it;
- HF's final ``layernorm`` as ``vision.ln_final``, only where the model reads it (``use_mean_pooling=False`` and
  ``vision_feature_layer=-1``);
- the CLS token dropped and the pixel shuffle: every ``scale`` x ``scale`` block of patches becomes one token's
  features, side by side (row-major), which is what ``hook_image_features`` sees.

Activations are [n_tiles, 1 + n_patches, d_vision] (CLS first, then patches in raster order);
``hook_image_features`` is [n_tiles, tokens_per_tile, scale**2 * d_vision] in raster order over the tile's
token grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn
from transformer_lens.components import LayerNorm, RMSNorm, TransformerBlock
from transformer_lens.config import HookedTransformerConfig

from vlm_lens._tl.components import with_full_width_qk_norm
from vlm_lens.architectures.idefics3.vision import pixel_shuffle
from vlm_lens.architectures.internvl.config import InternVLConfig
from vlm_lens.vision.vit import HookedViT

QK_NORM_EPS = 1e-6  # HF hard-codes it for the qk-norm, whatever the tower's layer_norm_eps


def _qk_norm(cfg: HookedTransformerConfig, length: int) -> RMSNorm:
    norm = RMSNorm(cfg, length=length)
    norm.eps = QK_NORM_EPS
    return norm


class HookedInternViT(HookedViT):
    """InternViT up to the layer the VLM reads: the shared ViT plus a patch bias, the CLS token, RMSNorm and
    qk-norm where the checkpoint has them, ``ln_final`` where it is read, and the pixel shuffle.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.internvl.testing import make_hf, tiny_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_config())).vision  # 16-px tiles, 4-px patches, shuffle 2
        >>> vision(torch.randn(3, 3, 16, 16)).shape  # [n_tiles, tokens_per_tile, 2 * 2 * d_vision]
        torch.Size([3, 4, 64])
    """

    def __init__(self, cfg: InternVLConfig, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, dtype)
        if cfg.vision.norm_type == "rms_norm":
            self.cfg.normalization_type = "RMS"
            self.blocks = nn.ModuleList([TransformerBlock(self.cfg, i) for i in range(len(self.blocks))])
        d = cfg.vision.d_model
        if cfg.vision.qk_norm:
            for block in self.blocks:
                with_full_width_qk_norm(block.attn, *(_qk_norm(self.cfg, d) for _ in "qk"))
        self.b_patch = nn.Parameter(torch.empty(d, dtype=dtype))
        self.class_embedding = nn.Parameter(torch.empty(d, dtype=dtype))
        if cfg.final_norm:
            self.ln_final = LayerNorm(self.cfg)  # HF's nn.LayerNorm whatever norm_type the blocks use

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        vcfg = self.vision_cfg
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (vcfg.n_channels, vcfg.image_size, vcfg.image_size):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}, but InternViT takes the tiles stacked "
                f"[n_tiles, {vcfg.n_channels}, {vcfg.image_size}, {vcfg.image_size}] (square tiles of its image_size). "
                "Prepare images with model.prepare(...) or the checkpoint's processor."
            )

    def forward(self, pixel_values: Float[torch.Tensor, "n_tiles channels height width"]
                ) -> Float[torch.Tensor, "n_tiles n_tokens d_features"]:
        """Tiles -> the pixel-shuffled patch features the projector reads (CLS dropped)."""
        self.check_pixels(pixel_values)
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=self.vision_cfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2).contiguous())
        n = x.shape[0]
        x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1)
        x = x + self.hook_pos_embed(self.W_pos.expand(n, -1, -1))
        x = self.selected_hidden_states(x)
        if self.vlm_cfg.final_norm:
            x = self.ln_final(x)
        return pixel_shuffle(x[:, 1:], self.vlm_cfg.scale_factor)
