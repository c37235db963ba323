"""The Pixtral vision encoder, hooked, at any image size.

Each image is cut into ``patch_size`` px patches (a convolution), RMS-normalised (``ln_pre``), then run through
pre-RMSNorm blocks with gated-SiLU/GELU MLPs and an axial 2-D rotary embedding (a patch's row turns one
quarter of each head's dimensions, its column the next quarter, both repeated for the second half).
transformers concatenates all images' patches into one sequence and restricts attention to each image's
block; here images are the batch, which is the same computation.

Layout of the activations, so TransformerLens tools read them as usual:

- ``vision.*`` activations are [n_images, max_patches, ...], each image's patches in **raster order**
  (``pos = row * cols + col`` over its own patch grid), zero-padded at the end to the largest image.
- ``vision.blocks.{l}.attn.hook_pattern`` is [n_images, heads, max_patches, max_patches]: zero outside the
  image; a padding row attends to itself alone (``vlm_lens.vision.padding``).
- ``hook_image_features`` / ``projector.hook_in``: [total_image_tokens, merge**2 * d_features], one row per
  language-model token in sequence order: the merged block's patches' features, row-major within the block
  (Mistral 3's merger weight is reordered to match when converted). ``d_features`` is ``d_vision`` per feature
  layer: LLaVA may read several, side by side in the order of ``vision_feature_layer``, as transformers does.

Reused from TransformerLens: ``TransformerBlock``, ``Attention`` (through ``MaskedRotaryAttention``),
``RMSNorm``, ``GatedMLP``. Pixtral's projections have no biases: TransformerLens's ``b_Q``, ``b_K``, ``b_V``,
``b_O``, ``b_in``, ``b_out`` hold zeros, as its own Mistral converter does for the language model.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.components import RMSNorm, TransformerBlock
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.architectures.pixtral.config import PixtralVisionConfig, PixtralVLMConfig
from vlm_lens.context import Scoped
from vlm_lens.rotary import rotate_half
from vlm_lens.vision.padding import additive, within_image


def pixtral_block_config(vcfg: PixtralVisionConfig, n_layers: int, dtype: torch.dtype) -> HookedTransformerConfig:
    """TL config of the blocks: bidirectional, RMSNorm, gated MLP, rotary over the whole head."""
    return HookedTransformerConfig(
        n_layers=max(n_layers, 1), d_model=vcfg.d_model, d_head=vcfg.d_head, n_heads=vcfg.n_heads,
        d_mlp=vcfg.d_mlp, d_vocab=1, act_fn=vcfg.act_fn, eps=vcfg.eps, normalization_type="RMS",
        attention_dir="bidirectional", gated_mlp=True, positional_embedding_type="rotary",
        rotary_dim=vcfg.d_head, rotary_adjacent_pairs=False, rotary_base=vcfg.rotary_base,
        n_ctx=1,  # unused: positions are 2-D and come with each image (TL's 1-D rotary tables stay empty)
        dtype=dtype, init_weights=False, original_architecture="pixtral_vision",
    )


@dataclass
class VisionContext:
    """Per-call inputs all vision attention layers share: the 2-D rotary and the additive image mask."""

    cos: torch.Tensor  # [n_images, max_patches, d_head]
    sin: torch.Tensor
    mask: torch.Tensor  # [n_images, 1, max_patches, max_patches]: 0 inside the image (a padding row: itself)


VISION_CALL: Scoped[VisionContext] = Scoped("vlm_lens_pixtral_vision_call")


def _context() -> VisionContext:
    ctx = VISION_CALL.get()
    if ctx is None:
        raise ValueError("The Pixtral vision attention runs only inside model.vision(pixel_values, image_sizes).")
    return ctx


def vision_rotary(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The 2-D rotary of the current tower call."""
    ctx = _context()
    cos, sin = ctx.cos[:, :, None].to(x.dtype), ctx.sin[:, :, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def image_mask() -> torch.Tensor:
    return _context().mask


def axial_angles(rows: torch.Tensor, cols: torch.Tensor, d_head: int, base: float) -> torch.Tensor:
    """[..., d_head] rotary angles of patches at (rows, cols), as transformers' ``PixtralVisionRotaryEmbedding``:
    frequencies ``base ** (-2k / d_head)``, the even ones for the row, the odd ones for the column."""
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head))
    half = torch.cat([rows[..., None].float() * inv_freq[0::2], cols[..., None].float() * inv_freq[1::2]], dim=-1)
    return torch.cat([half, half], dim=-1)


class HookedPixtralVision(nn.Module):
    """Patch embedding, ``ln_pre`` and the blocks up to the deepest feature layer; returns the projector's input:
    the feature layers' hidden states side by side (one layer for Mistral 3), a block of patches per row.

    Example:
        >>> from vlm_lens import HookedVLM
        >>> from vlm_lens.architectures.pixtral.testing import make_hf
        >>> vision = HookedVLM.from_hf(make_hf()).vision  # 4-px patches, merged 2x2
        >>> vision(torch.randn(1, 3, 32, 32), torch.tensor([[24, 32]])).shape  # 6x8 patches -> 3x4 tokens
        torch.Size([12, 64])
    """

    def __init__(self, cfg: PixtralVLMConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        vcfg: PixtralVisionConfig = cfg.vision
        self.vision_cfg, self.vlm_cfg = vcfg, cfg
        n_built = cfg.n_vision_layers_used
        self.cfg = pixtral_block_config(vcfg, n_built, dtype)
        p = vcfg.patch_size
        self.W_patch = nn.Parameter(torch.empty(vcfg.d_model, vcfg.n_channels, p, p, dtype=dtype))
        self.hook_patch_embed = HookPoint()  # [n_images, max_patches, d_vision]
        self.ln_pre = RMSNorm(self.cfg)
        self.blocks = nn.ModuleList()
        for i in range(n_built):
            block = TransformerBlock(self.cfg, i)
            block.attn = MaskedRotaryAttention(self.cfg, i, vision_rotary, image_mask)
            self.blocks.append(block)

    def forward(self, pixel_values: Float[torch.Tensor, "n_images channels height width"],
                image_sizes: Int[torch.Tensor, "n_images 2"]) -> Float[torch.Tensor, "n_tokens d_features"]:
        """Padded images and their processed (height, width) -> merger input in sequence order."""
        p, m = self.vision_cfg.patch_size, self.vlm_cfg.spatial_merge_size
        grids = [(int(h) // p, int(w) // p) for h, w in image_sizes.tolist()]
        patches = F.conv2d(pixel_values.to(self.W_patch), self.W_patch, stride=p)
        images = [patches[i, :, :h, :w].flatten(1).T for i, (h, w) in enumerate(grids)]
        x = self.hook_patch_embed(nn.utils.rnn.pad_sequence(images, batch_first=True))
        x = self.ln_pre(x)
        layers = self.vlm_cfg.feature_layers
        kept = {0: x}  # hidden-state index -> value: 0 is the blocks' input, k the output of block k - 1
        with VISION_CALL.bind(self._call_context(grids, x.shape[1], x.device)):
            for i, block in enumerate(self.blocks):
                x = kept[i + 1] = block(x)
        x = torch.cat([kept[layer] for layer in layers], dim=-1)
        return torch.cat([einops.rearrange(x[i, :h * w], "(R m1 C m2) d -> (R C) (m1 m2 d)", R=h // m, m1=m, m2=m)
                          for i, (h, w) in enumerate(grids)])

    def _call_context(self, grids: list[tuple[int, int]], n_max: int, device: torch.device) -> VisionContext:
        rows = torch.zeros(len(grids), n_max, dtype=torch.long)
        cols, valid = torch.zeros_like(rows), torch.zeros_like(rows, dtype=torch.bool)
        for i, (h, w) in enumerate(grids):
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            rows[i, :h * w], cols[i, :h * w], valid[i, :h * w] = r.flatten(), c.flatten(), True
        angles = axial_angles(rows, cols, self.cfg.d_head, self.vision_cfg.rotary_base).to(device)
        mask = additive(within_image(valid), self.cfg.dtype, device)
        return VisionContext(cos=angles.cos(), sin=angles.sin(), mask=mask)
