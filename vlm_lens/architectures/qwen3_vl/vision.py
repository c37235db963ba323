"""Qwen3-VL's vision transformer, hooked, at any image size.

As Qwen2.5-VL's tower (``vlm_lens.architectures.qwen2_5_vl.vision``: a still image repeated over
``temporal_patch_size`` frames, ``patch_size`` px patches, a 2-D rotary over rows and columns, images as the
batch in raster order), with these differences, read off transformers' ``Qwen3VLVisionModel``:

- the patch embedding has a bias, and a learned ``side x side`` position table, resampled bilinearly
  (corners aligned) to each image's patch grid, is added to it (``vision.hook_pos_embed``);
- blocks are pre-LayerNorm (with biases) with a plain GELU MLP, and every block attends over its whole image
  (no windows);
- the outputs of the ``deepstack_layers`` blocks are returned too, for the deepstack mergers.

Layout, as in Qwen2.5-VL: ``vision.*`` activations are [n_images, max_patches, ...], each image's patches in
raster order, padded at the end (padding rows are zero at the tower's input only: ignore them); the features returned (and ``hook_image_features``) are
[total_image_tokens, merge**2 * d_vision], one row per language-model token in sequence order.

Reused: TransformerLens's ``TransformerBlock`` (LayerNorm, MLP, hooks), ``MaskedRotaryAttention`` with the
Qwen2.5-VL tower's rotary and mask functions, which read ``VISION_CALL``.
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.components import TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.architectures.qwen2_5_vl.vision import VISION_CALL, VisionContext, full_mask, vision_rotary
from vlm_lens.architectures.qwen3_vl.config import Qwen3VisionConfig, Qwen3VLConfig
from vlm_lens.vision.padding import additive, within_image

Grid = tuple[int, int, int]


def qwen3_vision_block_config(vcfg: Qwen3VisionConfig, dtype: torch.dtype) -> HookedTransformerConfig:
    """TL config of the blocks: bidirectional, LayerNorm, plain MLP, rotary over the whole head."""
    return HookedTransformerConfig(
        n_layers=vcfg.n_layers, d_model=vcfg.d_model, d_head=vcfg.d_head, n_heads=vcfg.n_heads,
        d_mlp=vcfg.d_mlp, d_vocab=1, act_fn=vcfg.act_fn, eps=vcfg.eps, normalization_type="LN",
        attention_dir="bidirectional", gated_mlp=False, positional_embedding_type="rotary",
        rotary_dim=vcfg.d_head, rotary_adjacent_pairs=False, rotary_base=vcfg.rotary_base,
        n_ctx=1,  # unused: positions are 2-D and come with each image
        dtype=dtype, init_weights=False, original_architecture="qwen3_vl_vision",
    )


def vision_context(grids: list[Grid], n_max: int, d_head: int, base: float, dtype: torch.dtype,
                   device: torch.device) -> VisionContext:
    """2-D rotary (half the frequencies turn with the row, half with the column) and the mask that keeps
    each patch inside its own image, for patches in raster order padded to ``n_max``."""
    spatial = d_head // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    rows = torch.zeros(len(grids), n_max, dtype=torch.long)
    cols, valid = torch.zeros_like(rows), torch.zeros(len(grids), n_max, dtype=torch.bool)
    for i, (_, h, w) in enumerate(grids):
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows[i, :h * w], cols[i, :h * w], valid[i, :h * w] = r.flatten(), c.flatten(), True
    freqs = torch.cat([rows[..., None] * inv_freq, cols[..., None] * inv_freq], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).to(device)
    mask = additive(within_image(valid), dtype, device)
    return VisionContext(cos=freqs.cos(), sin=freqs.sin(), window_mask=mask, full_mask=mask)


class HookedQwen3VLVision(nn.Module):
    """Patch and position embeddings and blocks; returns the merger's input and the deepstack features.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.qwen3_vl.testing import make_hf, tiny_qwen3_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_qwen3_config())).vision  # 4-px patches, merged 2x2
        >>> features, deepstack = vision(torch.randn(32, vision.patch_dim), torch.tensor([[1, 4, 8]]))
        >>> features.shape, len(deepstack), deepstack[0].shape
        (torch.Size([8, 64]), 2, torch.Size([8, 64]))
    """

    def __init__(self, cfg: Qwen3VLConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg: Qwen3VisionConfig = cfg.vision
        self.vision_cfg = vcfg
        self.cfg = qwen3_vision_block_config(vcfg, dtype)
        p, t = vcfg.patch_size, vcfg.temporal_patch_size
        self.W_patch = nn.Parameter(torch.empty(vcfg.d_model, vcfg.n_channels, t, p, p, dtype=dtype))
        self.b_patch = nn.Parameter(torch.empty(vcfg.d_model, dtype=dtype))
        self.W_pos = nn.Parameter(torch.empty(vcfg.n_position_embeddings, vcfg.d_model, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, max_patches, d_vision]
        self.hook_pos_embed = HookPoint()  # [n_images, max_patches, d_vision], resampled to each grid
        self.blocks = nn.ModuleList()
        for i in range(vcfg.n_layers):
            block = TransformerBlock(self.cfg, i)
            block.attn = MaskedRotaryAttention(self.cfg, i, vision_rotary, full_mask)
            self.blocks.append(block)

    @property
    def patch_dim(self) -> int:
        return int(self.W_patch[0].numel())

    def forward(self, pixel_values: Float[torch.Tensor, "n_patches patch_dim"],
                grid_thw: Int[torch.Tensor, "n_images 3"]
                ) -> tuple[Float[torch.Tensor, "n_tokens d_features"], list[Float[torch.Tensor, "n_tokens d_features"]]]:
        """Processor patches (rows in its 2x2-block order) -> (merger input, one deepstack input per
        ``deepstack_layers`` entry), both in sequence order."""
        grids: list[Grid] = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        m = self.vision_cfg.spatial_merge_size
        if any(t != 1 or h % m or w % m for t, h, w in grids):
            raise ValueError(f"image_grid_thw {grids}: each row must be (1, h, w) with h and w multiples of {m} "
                             "(still images; videos are not supported). Use the checkpoint's image processor.")
        patches = F.linear(pixel_values.to(self.W_patch), self.W_patch.reshape(len(self.W_patch), -1), self.b_patch)
        images = [einops.rearrange(x, "(R C m1 m2) d -> (R m1 C m2) d", R=h // m, C=w // m, m1=m, m2=m)
                  for x, (_, h, w) in zip(patches.split([t * h * w for t, h, w in grids]), grids)]
        x = self.hook_patch_embed(nn.utils.rnn.pad_sequence(images, batch_first=True))
        x = x + self.hook_pos_embed(self._position_embeddings(grids, x.shape[1]))
        deepstack = []
        context = vision_context(grids, x.shape[1], self.cfg.d_head, self.vision_cfg.rotary_base, self.cfg.dtype,
                                 x.device)
        with VISION_CALL.bind(context):
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in self.vision_cfg.deepstack_layers:
                    deepstack.append(self._to_tokens(x, grids))
        return self._to_tokens(x, grids), deepstack

    def _position_embeddings(self, grids: list[Grid], n_max: int) -> torch.Tensor:
        """The learned table resampled (bilinear, corners aligned) to each image's patch grid, raster order."""
        side = self.vision_cfg.position_side
        table = einops.rearrange(self.W_pos, "(r c) d -> 1 d r c", r=side)
        out = self.W_pos.new_zeros(len(grids), n_max, self.W_pos.shape[-1])
        for i, (_, h, w) in enumerate(grids):
            resized = F.interpolate(table.float(), size=(h, w), mode="bilinear", align_corners=True)
            out[i, :h * w] = einops.rearrange(resized, "1 d r c -> (r c) d").to(out.dtype)
        return out

    def _to_tokens(self, x: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        """[n_images, max_patches, d] raster -> [n_tokens, merge**2 * d]: each merged block's patches, row-major."""
        m = self.vision_cfg.spatial_merge_size
        return torch.cat([einops.rearrange(x[i, :h * w], "(R m1 C m2) d -> (R C) (m1 m2 d)", R=h // m, m1=m, m2=m)
                          for i, (_, h, w) in enumerate(grids)])
