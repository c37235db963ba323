"""Mllama's vision tower, hooked: tiles, aspect-ratio embeddings, a local and a gated global transformer.

Read off transformers' ``MllamaVisionModel``. Each image is ``max_tiles`` tile slots of ``image_size`` px (the
processor pads unused slots with zeros; they run too, as in HF, because the local blocks' real positions attend
to them). Per tile: a class token and a ``grid x grid`` patch grid, zero-padded to a multiple of 8 positions.

Hooks (``vision.*``), in order:

- ``hook_patch_embed`` [n_images, tiles, patches, d]; ``hook_pre_tile_embed`` [n_images, tiles, 1, d] (the
  gated aspect-ratio embedding, added before the class token); ``hook_pos_embed`` [n_images, tiles, 1 + patches,
  d] (gated position and tile-position embeddings); ``ln_pre.hook_normalized``;
- ``blocks.{l}.*`` (local) then ``ln_post.hook_normalized``, ``hook_post_tile_embed`` [n_images, tiles, 1, d],
  then ``global_blocks.{l}.*`` (gated): each block on [n_images, tiles * padded_positions, d] with TransformerLens's
  hook names (``hook_resid_pre``, ``attn.hook_*``, ``hook_attn_out`` (after the gate), ``mlp.hook_{pre,post}``, ...).

The features (``hook_image_features``) are [n_images, tiles * (1 + patches), d * (1 + n_intermediate)]: the
global output, then the ``intermediate_layers`` local outputs interleaved as HF stacks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn
from transformer_lens.components import MLP, LayerNorm
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.architectures.mllama.config import MllamaConfig, MllamaVisionConfig
from vlm_lens.context import Scoped

TILE_MASK: Scoped[torch.Tensor] = Scoped("mllama_tile_mask")  # additive [n_images, 1, n, n] of the current tower call


def _tile_mask() -> torch.Tensor | None:
    return TILE_MASK.get()


def _no_rotary(x: torch.Tensor, offset: int) -> torch.Tensor:
    return x  # the tower's positions are learned embeddings; TransformerLens never calls this here


def vision_block_config(vcfg: MllamaVisionConfig, dtype: torch.dtype) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=vcfg.n_layers, d_model=vcfg.d_model, d_head=vcfg.d_head, n_heads=vcfg.n_heads, d_mlp=vcfg.d_mlp,
        d_vocab=1, n_ctx=1, act_fn=vcfg.act_fn, eps=vcfg.eps, normalization_type="LN",
        attention_dir="bidirectional", positional_embedding_type="standard", dtype=dtype, init_weights=False,
        original_architecture="mllama_vision",
    )


def tile_attention_mask(aspect_ratio_mask: torch.Tensor, n_real: int, n_padded: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """HF's mask: a position is padding if its tile is or it pads the tile to ``n_padded``; only pairs of two
    padding positions are masked (with the dtype's minimum)."""
    n, tiles = aspect_ratio_mask.shape
    pad = (1 - aspect_ratio_mask.to(dtype)).view(n, tiles, 1).repeat(1, 1, n_padded)
    pad[:, :, n_real:] = 1
    pad = pad.reshape(n, tiles * n_padded, 1)
    return (pad @ pad.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


class MllamaVisionBlock(nn.Module):
    """Pre-LayerNorm block; the global ones scale attention and MLP outputs by ``tanh`` of a learned gate."""

    def __init__(self, cfg: HookedTransformerConfig, layer: int, gated: bool):
        super().__init__()
        self.cfg = cfg
        self.ln1, self.ln2 = LayerNorm(cfg), LayerNorm(cfg)
        self.attn = MaskedRotaryAttention(cfg, layer, _no_rotary, _tile_mask)
        self.mlp = MLP(cfg)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.empty(1, dtype=cfg.dtype))
            self.gate_ffn = nn.Parameter(torch.empty(1, dtype=cfg.dtype))
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: Float[torch.Tensor, "n pos d"]) -> Float[torch.Tensor, "n pos d"]:
        x = self.hook_resid_pre(x)
        normed = self.ln1(x)
        attn = self.attn(normed, normed, normed)
        if self.gated:
            attn = self.gate_attn.tanh() * attn
        mid = self.hook_resid_mid(x + self.hook_attn_out(attn))
        mlp = self.mlp(self.ln2(mid))
        if self.gated:
            mlp = self.gate_ffn.tanh() * mlp
        return self.hook_resid_post(mid + self.hook_mlp_out(mlp))


class HookedMllamaVision(nn.Module):
    """Tiles -> features for the projector; see the module docstring for the hooks."""

    def __init__(self, cfg: MllamaConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        v: MllamaVisionConfig = cfg.vision
        self.vision_cfg, self.cfg = v, vision_block_config(v, dtype)
        n_ratio, tiles, d, positions = len(v.aspect_ratios) + 1, v.max_tiles, v.d_model, v.n_tile_positions
        self.W_patch = nn.Parameter(torch.empty(d, v.n_channels, v.patch_size, v.patch_size, dtype=dtype))
        self.class_embedding = nn.Parameter(torch.empty(d, dtype=dtype))
        self.W_pos = nn.Parameter(torch.empty(positions, d, dtype=dtype))
        self.W_tile_pos = nn.Parameter(torch.empty(n_ratio, tiles * positions * d, dtype=dtype))
        self.pos_gate = nn.Parameter(torch.empty(1, dtype=dtype))
        self.W_pre_tile = nn.Parameter(torch.empty(n_ratio, tiles * d, dtype=dtype))
        self.pre_tile_gate = nn.Parameter(torch.empty(1, dtype=dtype))
        self.W_post_tile = nn.Parameter(torch.empty(n_ratio, tiles * d, dtype=dtype))
        self.post_tile_gate = nn.Parameter(torch.empty(1, dtype=dtype))
        self.ln_pre, self.ln_post = LayerNorm(self.cfg), LayerNorm(self.cfg)
        self.blocks = nn.ModuleList(MllamaVisionBlock(self.cfg, i, gated=False) for i in range(v.n_layers))
        self.global_blocks = nn.ModuleList(MllamaVisionBlock(self.cfg, i, gated=True) for i in range(v.n_global_layers))
        self.hook_patch_embed, self.hook_pre_tile_embed, self.hook_pos_embed = HookPoint(), HookPoint(), HookPoint()
        self.hook_post_tile_embed = HookPoint()

    def _tile_embed(self, table: torch.Tensor, gate: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return gate.tanh() * table[ids].reshape(len(ids), self.vision_cfg.max_tiles, 1, -1)

    def forward(self, pixel_values: Float[torch.Tensor, "n tiles channels height width"],
                aspect_ratio_ids: Int[torch.Tensor, " n"], aspect_ratio_mask: Int[torch.Tensor, "n tiles"]
                ) -> Float[torch.Tensor, "n keys d_features"]:
        v = self.vision_cfg
        n, tiles = pixel_values.shape[:2]
        if tiles != v.max_tiles:
            raise ValueError(f"pixel_values have {tiles} tile slots per image but the tower expects max_num_tiles="
                             f"{v.max_tiles}; use the checkpoint's image processor.")
        flat = pixel_values.reshape(n * tiles, *pixel_values.shape[2:]).to(self.W_patch)
        patches = F.conv2d(flat, self.W_patch, stride=v.patch_size).flatten(2).transpose(1, 2)
        x = self.hook_patch_embed(patches.reshape(n, tiles, -1, v.d_model))
        x = x + self.hook_pre_tile_embed(self._tile_embed(self.W_pre_tile, self.pre_tile_gate, aspect_ratio_ids))
        x = torch.cat([self.class_embedding.expand(n, tiles, 1, v.d_model), x], dim=2)
        gate = self.pos_gate.tanh()
        tile_pos = self.W_tile_pos[aspect_ratio_ids].reshape(n, tiles, v.n_tile_positions, v.d_model)
        x = x + self.hook_pos_embed((1 - gate) * self.W_pos + gate * tile_pos)
        x = self.ln_pre(x.reshape(n, tiles * v.n_tile_positions, v.d_model)).reshape(n, tiles, -1, v.d_model)
        real = v.n_tile_positions
        padded = real + (8 - real % 8) % 8
        x = F.pad(x, (0, 0, 0, padded - real)).reshape(n, tiles * padded, v.d_model)
        intermediate: dict[int, torch.Tensor] = {}
        with TILE_MASK.bind(tile_attention_mask(aspect_ratio_mask, real, padded, x.dtype)):
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i in v.intermediate_layers:
                    intermediate[i] = x
            x = self.ln_post(x).reshape(n, tiles, padded, v.d_model)
            x = x + self.hook_post_tile_embed(self._tile_embed(self.W_post_tile, self.post_tile_gate, aspect_ratio_ids))
            x = x.reshape(n, tiles * padded, v.d_model)
            for block in self.global_blocks:
                x = block(x)
        x = x.reshape(n, tiles, padded, -1)[:, :, :real]
        if v.intermediate_layers:  # HF stacks them on a last axis, then flattens: features interleave layers
            inter = torch.stack([intermediate[i].reshape(n, tiles, padded, -1)[:, :, :real]
                                 for i in v.intermediate_layers], dim=-1)
            x = torch.cat([x, inter.flatten(-2)], dim=-1)
        features = x
        return features.reshape(n, tiles * real, -1)
