"""Qwen2.5-VL's vision transformer and patch merger, hooked, at any image size.

Each image is cut into ``patch_size`` px patches (a still image is repeated ``temporal_patch_size``
times, so a patch spans two identical frames); blocks are pre-RMSNorm with SwiGLU MLPs and a 2-D rotary
embedding (row and column), attending inside windows of ``window_size`` px except the
``full_attention_layers``, which attend over the whole image. The merger (``projector``) normalises each
patch and maps every ``spatial_merge_size`` x ``spatial_merge_size`` block of patches to one token.

Layout of the activations, so TransformerLens tools read them as usual:

- Images are the batch: ``vision.*`` activations are [n_images, max_patches, ...], each image's patches
  in **raster order** (row-major over its patch grid, ``pos = row * cols + col``), padded at the end to the
  largest image (padding rows are zero at the tower's input only: ignore them). Neither the processor's order (2x2 blocks) nor transformers' window order.
- ``vision.blocks.{l}.attn.hook_pattern`` is [n_images, heads, max_patches, max_patches] in that order:
  zero outside each patch's window (windowed blocks) and outside the image (full blocks); a padding row
  attends to itself alone (``vlm_lens.vision.padding``: a row with no key made NaN gradients).
- ``hook_image_features`` / ``projector.hook_in``: [total_image_tokens, merge**2 * d_vision], one row per
  language-model token in sequence order: the block's patches' features, row-major within the block.

Reused from TransformerLens: ``TransformerBlock`` (hooks, residual wiring), ``Attention`` (projections,
scores, pattern, z, result), ``RMSNorm``, ``GatedMLP``. Written here, because TransformerLens has no
equivalent: the rotary (2-D, not positional), the window mask (passed as TL's additive mask), and the MLP's
gate and up biases (TL's ``GatedMLP`` has one bias, added after the product).

Qwen2-VL's tower (``vlm_lens.architectures.qwen2_vl.vision``) is this one with LayerNorm, a plain MLP and no
windows: it overrides ``block_config`` and ``make_mlp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.components import GatedMLP, TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.architectures.qwen2_5_vl.config import Qwen2_5_VLConfig, QwenVisionConfig
from vlm_lens.context import Scoped
from vlm_lens.rotary import rotate_half
from vlm_lens.vision.padding import additive, within_image


def qwen_vision_block_config(vcfg: QwenVisionConfig, dtype: torch.dtype, normalization_type: str = "RMS",
                             gated_mlp: bool = True, act_fn: str | None = None) -> HookedTransformerConfig:
    """TL config of the blocks: bidirectional, rotary over the whole head; RMSNorm and a gated MLP unless told
    otherwise. ``act_fn`` overrides ``vcfg.act_fn`` (for an activation TL's config rejects, set on the MLP later)."""
    return HookedTransformerConfig(
        n_layers=vcfg.n_layers, d_model=vcfg.d_model, d_head=vcfg.d_head, n_heads=vcfg.n_heads,
        d_mlp=vcfg.d_mlp, d_vocab=1, act_fn=act_fn or vcfg.act_fn, eps=vcfg.eps,
        normalization_type=normalization_type, attention_dir="bidirectional", gated_mlp=gated_mlp,
        positional_embedding_type="rotary",
        rotary_dim=vcfg.d_head, rotary_adjacent_pairs=False, rotary_base=vcfg.rotary_base,
        n_ctx=1,  # unused: positions are 2-D and come with each image (TL's 1-D rotary tables stay empty)
        dtype=dtype, init_weights=False, original_architecture="qwen2_5_vl_vision",
    )


@dataclass
class VisionContext:
    """Per-call inputs all vision attention layers share: the 2-D rotary and the additive masks."""

    cos: torch.Tensor  # [n_images, max_patches, d_head], float32
    sin: torch.Tensor
    window_mask: torch.Tensor  # [n_images, 1, max_patches, max_patches]: 0 or -inf
    full_mask: torch.Tensor


VISION_CALL: Scoped[VisionContext] = Scoped("vlm_lens_qwen_vision_call")


def _context() -> VisionContext:
    ctx = VISION_CALL.get()
    if ctx is None:
        raise ValueError("The Qwen vision attention runs only inside model.vision(pixel_values, grid_thw).")
    return ctx


def vision_rotary(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The 2-D rotary of the current tower call, in float32 as transformers does."""
    ctx = _context()
    cos, sin = ctx.cos[:, :, None], ctx.sin[:, :, None]
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def window_mask() -> torch.Tensor:
    return _context().window_mask


def full_mask() -> torch.Tensor:
    return _context().full_mask


class QwenVisionMLP(GatedMLP):
    """SwiGLU with HF's biases: ``W_out (act(x W_gate + b_gate) * (x W_in + b_in)) + b_out``.

    Hooks as TL's ``GatedMLP``: ``hook_pre`` (gate, before the activation), ``hook_pre_linear``, ``hook_post``.
    """

    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(self.d_mlp, dtype=self.cfg.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on the transposed view is HF's nn.Linear call: the bias is added inside the product, one
        # rounding in half precision (x @ W + b rounds twice)
        pre_act = self.hook_pre(F.linear(x, self.W_gate.T, self.b_gate))
        pre_linear = self.hook_pre_linear(F.linear(x, self.W_in.T, self.b_in))
        post_act = self.hook_post(self.act_fn(pre_act) * pre_linear)
        return F.linear(post_act, self.W_out.T, self.b_out)


class HookedQwen2_5_VLVision(nn.Module):
    """Patch embedding and blocks; returns the features the merger reads, one row per LM token.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.qwen2_5_vl.testing import make_hf, tiny_qwen_config
        >>> vision = HookedVLM.from_hf(make_hf(tiny_qwen_config())).vision  # 4-px patches, merged 2x2
        >>> vision(torch.randn(32, vision.patch_dim), torch.tensor([[1, 4, 8]])).shape  # 4x8 patches
        torch.Size([8, 64])
    """

    def __init__(self, cfg: Qwen2_5_VLConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg: QwenVisionConfig = cfg.vision
        self.vision_cfg = vcfg
        self.vlm_cfg = cfg
        self.cfg = self.block_config(vcfg, dtype)
        p, t = vcfg.patch_size, vcfg.temporal_patch_size
        self.W_patch = nn.Parameter(torch.empty(vcfg.d_model, vcfg.n_channels, t, p, p, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, max_patches, d_vision]
        self.blocks = nn.ModuleList()
        for i in range(vcfg.n_layers):
            block = TransformerBlock(self.cfg, i)
            windowed = vcfg.window_size is not None and i not in vcfg.full_attention_layers
            block.attn = MaskedRotaryAttention(self.cfg, i, vision_rotary, window_mask if windowed else full_mask)
            block.mlp = self.make_mlp()
            self.blocks.append(block)

    @staticmethod
    def block_config(vcfg: QwenVisionConfig, dtype: torch.dtype) -> HookedTransformerConfig:
        return qwen_vision_block_config(vcfg, dtype)

    def make_mlp(self) -> nn.Module:
        return QwenVisionMLP(self.cfg)

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
        with VISION_CALL.bind(self._call_context(grids, x.shape[1], x.device)):
            for block in self.blocks:
                x = block(x)
        return torch.cat([einops.rearrange(x[i, :h * w], "(R m1 C m2) d -> (R C) (m1 m2 d)", R=h // m, m1=m, m2=m)
                          for i, (_, h, w) in enumerate(grids)])

    def _call_context(self, grids: list[tuple[int, int, int]], n_max: int, device: torch.device) -> VisionContext:
        vcfg = self.vision_cfg
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
        same_image = within_image(window >= 0)
        same_window = same_image & (window[:, :, None] == window[:, None, :])
        full = additive(same_image, self.cfg.dtype, device)
        windows = full if side is None else additive(same_window, self.cfg.dtype, device)
        return VisionContext(cos=freqs.cos(), sin=freqs.sin(), full_mask=full, window_mask=windows)
