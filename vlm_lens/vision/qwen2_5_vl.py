"""Qwen2.5-VL's vision transformer and patch merger, hooked, at any image size.

Each image is cut into ``patch_size`` px patches (a still image is repeated ``temporal_patch_size``
times, so a patch spans two identical frames); blocks are pre-RMSNorm with SwiGLU MLPs and a 2-D rotary
embedding (row and column), attending inside windows of ``window_size`` px except the
``full_attention_layers``, which attend over the whole image. The merger (``projector``) normalises each
patch and maps every ``spatial_merge_size`` x ``spatial_merge_size`` block of patches to one token.

Layout of the activations, so TransformerLens tools read them as usual:

- Images are the batch: ``vision.*`` activations are [n_images, max_patches, ...], each image's patches
  in **raster order** (row-major over its patch grid, ``pos = row * cols + col``), zero-padded at the end
  to the largest image. Neither the processor's order (2x2 blocks) nor transformers' window order.
- ``vision.blocks.{l}.attn.hook_pattern`` is [n_images, heads, max_patches, max_patches] in that order:
  zero outside each patch's window (windowed blocks), outside the image (full blocks) and for padding.
- ``hook_image_features`` / ``projector.hook_in``: [total_image_tokens, merge**2 * d_vision], one row per
  language-model token in sequence order: the block's patches' features, row-major within the block.

Reused from TransformerLens: ``TransformerBlock`` (hooks, residual wiring), ``Attention`` (projections,
scores, pattern, z, result), ``RMSNorm``, ``GatedMLP``. Written here, because TransformerLens has no
equivalent: the rotary (2-D, not positional), the window mask (passed as TL's additive mask), and the MLP's
gate and up biases (TL's ``GatedMLP`` has one bias, added after the product).
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.components import Attention, GatedMLP, RMSNorm, TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.config import VisionConfig, VLMConfig
from vlm_lens.mrope import rotate_half


def qwen_vision_block_config(vcfg: VisionConfig, dtype: torch.dtype) -> HookedTransformerConfig:
    """TL config of the blocks: bidirectional, RMSNorm, gated MLP, rotary over the whole head."""
    return HookedTransformerConfig(
        n_layers=vcfg.n_layers, d_model=vcfg.d_model, d_head=vcfg.d_head, n_heads=vcfg.n_heads,
        d_mlp=vcfg.d_mlp, d_vocab=1, act_fn=vcfg.act_fn, eps=vcfg.eps, normalization_type="RMS",
        attention_dir="bidirectional", gated_mlp=True, positional_embedding_type="rotary",
        rotary_dim=vcfg.d_head, rotary_adjacent_pairs=False, rotary_base=vcfg.rotary_base,
        n_ctx=1,  # unused: positions are 2-D and come with each image (TL's 1-D rotary tables stay empty)
        dtype=dtype, init_weights=False, original_architecture="qwen2_5_vl_vision",
    )


class VisionContext:
    """Per-call inputs all vision attention layers share: the 2-D rotary and the additive masks."""

    cos: torch.Tensor | None = None  # [n_images, max_patches, d_head], float32
    sin: torch.Tensor | None = None
    window_mask: torch.Tensor | None = None  # [n_images, 1, max_patches, max_patches]: 0 or -inf
    full_mask: torch.Tensor | None = None

    def clear(self) -> None:
        self.cos = self.sin = self.window_mask = self.full_mask = None


class QwenVisionAttention(Attention):
    """TL ``Attention`` with the 2-D rotary and the window (or whole-image) mask from the shared context."""

    def __init__(self, cfg: HookedTransformerConfig, layer_id: int, context: VisionContext, full_attention: bool):
        super().__init__(cfg, "global", layer_id)
        self.context = context  # a plain object, not a submodule: one per tower
        self.full_attention = full_attention

    def apply_rotary(self, x: torch.Tensor, past_kv_pos_offset: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.context.cos is None:
            raise ValueError("The Qwen2.5-VL vision attention runs only inside model.vision(pixel_values, grid_thw).")
        cos, sin = self.context.cos[:, :, None], self.context.sin[:, :, None]
        x32 = x.float()  # in float32, as transformers does
        return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)

    def forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        mask = self.context.full_mask if self.full_attention else self.context.window_mask
        return super().forward(query_input, key_input, value_input, additive_attention_mask=mask)


class QwenVisionMLP(GatedMLP):
    """SwiGLU with HF's biases: ``W_out (act(x W_gate + b_gate) * (x W_in + b_in)) + b_out``.

    Hooks as TL's ``GatedMLP``: ``hook_pre`` (gate, before the activation), ``hook_pre_linear``, ``hook_post``.
    """

    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(self.d_mlp, dtype=self.cfg.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre_act = self.hook_pre(x @ self.W_gate + self.b_gate)
        pre_linear = self.hook_pre_linear(x @ self.W_in + self.b_in)
        post_act = self.hook_post(self.act_fn(pre_act) * pre_linear)
        return post_act @ self.W_out + self.b_out


class HookedQwen2_5_VLVision(nn.Module):
    """Patch embedding and blocks; returns the features the merger reads, one row per LM token.

    Example:
        >>> feats = model.vision(inputs.pixel_values, inputs.extras["image_grid_thw"])  # doctest: +SKIP
    """

    def __init__(self, cfg: VLMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg = self.vision_cfg = cfg.vision
        if vcfg.rotary_base is None or vcfg.image_size is not None:
            raise ValueError("A qwen2_5_vl VisionConfig needs rotary_base (the 2-D rotary theta) and image_size=None "
                             "(images come at any size); build it with vlm_lens.conversion.qwen2_5_vl.")
        self.vlm_cfg = cfg
        self.cfg = qwen_vision_block_config(vcfg, dtype)
        p, t = vcfg.patch_size, vcfg.temporal_patch_size
        self.W_patch = nn.Parameter(torch.empty(vcfg.d_model, vcfg.n_channels, t, p, p, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, max_patches, d_vision]
        self.context = VisionContext()
        self.blocks = nn.ModuleList()
        for i in range(vcfg.n_layers):
            block = TransformerBlock(self.cfg, i)
            block.attn = QwenVisionAttention(self.cfg, i, self.context, i in vcfg.full_attention_layers)
            block.mlp = QwenVisionMLP(self.cfg)
            self.blocks.append(block)

    @property
    def patch_dim(self) -> int:
        return int(self.W_patch[0].numel())

    def forward(self, pixel_values: Float[torch.Tensor, "n_patches patch_dim"],
                grid_thw: Int[torch.Tensor, "n_images 3"]) -> Float[torch.Tensor, "n_tokens d_features"]:
        """Processor patches (rows in its 2x2-block order) -> merger input in sequence order."""
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        m = self.vision_cfg.spatial_merge_size
        if any(t != 1 or h % m or w % m for t, h, w in grids):
            raise ValueError(f"image_grid_thw {grids}: each row must be (1, h, w) with h and w multiples of {m} "
                             "(still images; videos are not supported). Use the checkpoint's image processor.")
        patches = F.linear(pixel_values.to(self.W_patch), self.W_patch.reshape(len(self.W_patch), -1))
        images = [einops.rearrange(x, "(R C m1 m2) d -> (R m1 C m2) d", R=h // m, C=w // m, m1=m, m2=m)
                  for x, (_, h, w) in zip(patches.split([t * h * w for t, h, w in grids]), grids)]
        x = self.hook_patch_embed(nn.utils.rnn.pad_sequence(images, batch_first=True))
        self._set_context(grids, x.shape[1], x.device)
        try:
            for block in self.blocks:
                x = block(x)
        finally:
            self.context.clear()
        return torch.cat([einops.rearrange(x[i, :h * w], "(R m1 C m2) d -> (R C) (m1 m2 d)", R=h // m, m1=m, m2=m)
                          for i, (_, h, w) in enumerate(grids)])

    def _set_context(self, grids: list[tuple[int, int, int]], n_max: int, device: torch.device) -> None:
        vcfg, ctx = self.vision_cfg, self.context
        spatial = self.cfg.d_head // 2  # half the frequencies turn with the row, half with the column
        inv_freq = 1.0 / (vcfg.rotary_base ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        rows = torch.zeros(len(grids), n_max, dtype=torch.long)
        cols, window = torch.zeros_like(rows), torch.full_like(rows, -1)  # window -1: padding
        m, side = vcfg.spatial_merge_size, vcfg.window_tokens
        for i, (_, h, w) in enumerate(grids):
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            rows[i, :h * w], cols[i, :h * w] = r.flatten(), c.flatten()
            if side is None:
                window[i, :h * w] = 0
            else:
                per_row = -(-(w // m) // side)
                window[i, :h * w] = (r.flatten() // m // side) * per_row + c.flatten() // m // side
        freqs = torch.cat([rows[..., None] * inv_freq, cols[..., None] * inv_freq], dim=-1)
        freqs = torch.cat([freqs, freqs], dim=-1).to(device)
        ctx.cos, ctx.sin = freqs.cos(), freqs.sin()
        valid = window >= 0
        same_image = valid[:, :, None] & valid[:, None, :]
        same_window = same_image & (window[:, :, None] == window[:, None, :])
        ignore = torch.tensor(float("-inf"), dtype=self.cfg.dtype)
        zero = torch.tensor(0.0, dtype=self.cfg.dtype)
        ctx.full_mask = torch.where(same_image, zero, ignore)[:, None].to(device)
        ctx.window_mask = torch.where(same_window, zero, ignore)[:, None].to(device)


class PatchMerger(nn.Module):
    """Qwen2.5-VL's projector: RMSNorm per patch, then ``W_out gelu(W_in x + b_in) + b_out`` per block.

    Hooks: ``projector.hook_in`` [n_tokens, merge**2 * d_vision] (the image features), ``projector.ln_q.*``
    [n_tokens, merge**2, d_vision], ``projector.hook_hidden`` after the GELU, ``projector.hook_out``
    [n_tokens, d_model].
    """

    def __init__(self, cfg: VLMConfig, d_model: int, vision_cfg: HookedTransformerConfig):
        super().__init__()
        vcfg = cfg.vision
        self.n_merged = vcfg.spatial_merge_size**2
        d_in = vcfg.d_model * self.n_merged
        dtype = vision_cfg.dtype
        self.ln_q = RMSNorm(vision_cfg, length=vcfg.d_model)  # shares the tower's config: dtype moves with it
        self.W_in = nn.Parameter(torch.empty(d_in, d_in, dtype=dtype))
        self.b_in = nn.Parameter(torch.empty(d_in, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_in, d_model, dtype=dtype))
        self.b_out = nn.Parameter(torch.empty(d_model, dtype=dtype))
        self.hook_in = HookPoint()
        self.hook_hidden = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, features: Float[torch.Tensor, "n_tokens d_features"]) -> Float[torch.Tensor, "n_tokens d_model"]:
        x = self.hook_in(features.to(self.W_in.dtype))
        x = self.ln_q(x.reshape(len(x), self.n_merged, -1)).reshape(len(x), -1)
        hidden = self.hook_hidden(F.gelu(torch.addmm(self.b_in, x, self.W_in)))
        return self.hook_out(torch.addmm(self.b_out, hidden, self.W_out))
