"""Idefics3's vision tower (``Idefics3VisionTransformer``), hooked, and the pixel shuffle after it.

A SigLIP-like pre-norm ViT run on every tile (crop or global image) of every image:

- patch embedding (a convolution with a bias) and learned position embeddings, looked up from each patch's
  fractional coordinates in the tile's valid area (NaViT-style, as HF's ``Idefics3VisionEmbeddings``): a
  fully valid tile of ``image_size`` px gets positions ``0..n_patches-1``;
- TransformerLens blocks with bidirectional attention; patches outside a tile's ``patch_mask`` (padding)
  are masked as keys through TL's additive mask (``MaskedRotaryAttention``, no rotary);
- ``post_layernorm`` as ``vision.ln_final``, which HF applies to the last layer;
- the connector's pixel shuffle: every ``scale_factor`` x ``scale_factor`` block of patches becomes one
  token's features, side by side (row-major), which is what ``hook_image_features`` sees.

Activations are [n_tiles, n_patches, d_vision] with patches in raster order; ``hook_image_features`` is
[n_tiles, tokens_per_tile, scale_factor**2 * d_vision] with tokens in raster order over the tile's token grid.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import nn
from transformer_lens.components import LayerNorm

from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.architectures.idefics3.config import Idefics3Config
from vlm_lens.context import Scoped
from vlm_lens.vision.vit import HookedViT

# The additive key mask [n_tiles, 1, 1, n_patches] of the current tower call (None: every patch is valid).
PATCH_MASK: Scoped[torch.Tensor] = Scoped("vlm_lens_idefics3_patch_mask")


def patch_mask_bias() -> torch.Tensor | None:
    return PATCH_MASK.get()


def _no_rotary(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Never called: the blocks' config has standard (added) position embeddings, so TL applies no rotary."""
    return x


def position_ids(patch_mask: Bool[torch.Tensor, "n_tiles rows cols"], per_side: int) -> Int[torch.Tensor, "n_tiles n_patches"]:
    """HF's ``Idefics3VisionEmbeddings`` position ids: each valid patch's fractional (row, col) in the valid
    area, bucketed onto the ``per_side`` x ``per_side`` table; padding patches get 0."""
    n, rows, cols = patch_mask.shape
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
    step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1).cpu()
    step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1).cpu()
    frac_h = (torch.arange(rows, dtype=torch.float32)[None, :] * step_h[:, None]).clamp(max=1.0 - 1e-6)
    frac_w = (torch.arange(cols, dtype=torch.float32)[None, :] * step_w[:, None]).clamp(max=1.0 - 1e-6)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    ids = (bucket_h[:, :, None] * per_side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1).cpu(), ids, torch.zeros_like(ids))


def pixel_shuffle(x: Float[torch.Tensor, "n_tiles n_patches d"], scale: int
                  ) -> Float[torch.Tensor, "n_tiles n_tokens d_out"]:
    """HF's ``Idefics3Connector.pixel_shuffle``: token (R, C) of a square patch grid gets the features of
    patches (R*scale + r, C*scale + c), ordered by (r, c), side by side."""
    side = round(x.shape[1] ** 0.5)
    return einops.rearrange(x, "n (R r C c) d -> n (R C) (r c d)", R=side // scale, r=scale, C=side // scale, c=scale)


class HookedIdefics3Vision(HookedViT):
    """Idefics3's tower: the shared ViT (patch and position embeddings, TL blocks), a patch-embedding bias,
    masked attention over padded patches, ``ln_final`` and the pixel shuffle.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.idefics3.testing import make_hf, tiny_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_config())).vision  # 16-px tiles, 4-px patches, shuffle 2
        >>> vision(torch.randn(3, 3, 16, 16)).shape  # [n_tiles, tokens_per_tile, 2 * 2 * d_vision]
        torch.Size([3, 4, 64])
    """

    def __init__(self, cfg: Idefics3Config, dtype: torch.dtype = torch.float32):
        super().__init__(cfg, dtype)
        self.b_patch = nn.Parameter(torch.empty(cfg.vision.d_model, dtype=dtype))
        for i, block in enumerate(self.blocks):
            block.attn = MaskedRotaryAttention(self.cfg, i, _no_rotary, patch_mask_bias)
        self.ln_final = LayerNorm(self.cfg)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        vcfg = self.vision_cfg
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (vcfg.n_channels, vcfg.image_size, vcfg.image_size):
            raise ValueError(
                f"tiles have shape {tuple(pixel_values.shape)}, but this tower takes [n_tiles, {vcfg.n_channels}, "
                f"{vcfg.image_size}, {vcfg.image_size}]: square tiles of the tower's image_size (the processor's "
                "max_image_size). Prepare images with model.prepare(...) or the checkpoint's processor."
            )

    def forward(self, pixel_values: Float[torch.Tensor, "n_tiles channels height width"],
                patch_mask: Bool[torch.Tensor, "n_tiles rows cols"] | None = None
                ) -> Float[torch.Tensor, "n_tiles n_tokens d_features"]:
        """Tiles (and which of their patches are real) -> the pixel-shuffled features the projector reads."""
        self.check_pixels(pixel_values)
        vcfg = self.vision_cfg
        n, side = len(pixel_values), vcfg.grid_size
        if patch_mask is None:
            patch_mask = torch.ones(n, side, side, dtype=torch.bool)
        if tuple(patch_mask.shape) != (n, side, side) or not patch_mask.flatten(1).any(1).all():
            raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}; expected [{n}, {side}, {side}] with at "
                             "least one real patch per tile.")
        x = F.conv2d(pixel_values.to(self.W_patch.dtype), self.W_patch, self.b_patch, stride=vcfg.patch_size)
        x = self.hook_patch_embed(x.flatten(2).transpose(1, 2).contiguous())
        ids = position_ids(patch_mask, side).to(x.device)
        x = x + self.hook_pos_embed(self.W_pos[ids])
        bias = None
        if not patch_mask.all():
            zero, ignore = torch.tensor(0.0, dtype=x.dtype), torch.tensor(float("-inf"), dtype=x.dtype)
            bias = torch.where(patch_mask.reshape(n, 1, 1, -1).cpu(), zero, ignore).to(x.device)
        with PATCH_MASK.bind(bias):
            x = self.selected_hidden_states(x)
        return pixel_shuffle(self.ln_final(x), self.vlm_cfg.scale_factor)
