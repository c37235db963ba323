"""Gated cross-attention blocks: how the language model reads the image.

transformers' ``MllamaCrossAttentionDecoderLayer`` sits in the decoder's layer list at each of
``cross_attention_layers``: text queries attend to keys and values computed from the projected vision features
(``hook_image_embeds``), each image being ``max_tiles * (1 + patches)`` keys; the attention and MLP outputs are
scaled by ``tanh`` of learned gates. ``CrossAttentionBlock`` is that layer with TransformerLens-style hooks.

Per call it reads ``CallContext.image_embeds`` and ``CallContext.side_outputs[CROSS]`` (a ``CrossKeys``, made by
the pipeline). Semantics, per batch row, as HF on that row alone:

- a row's keys are its own images' (its tile slots, padding tiles included); a query attends to the tiles the
  processor's ``cross_attention_mask`` allows, or, if it allows none (text before the first ``<|image|>``), to
  all of the row's keys with the MLP term zeroed, as HF does;
- a row without images skips the block (its output is its input), as HF skips the layer without images. In
  HF's *batched* forward such a row instead attends to the zero-padded image slot (only its MLP term is zeroed),
  so HF's batched logits for it differ from HF's own single-row result; vlm_lens keeps the single-row result.
- new tokens in ``generate`` use the prompt's last mask row (HF extends the mask the same way); keys and values
  are computed once per image encode and kept in ``CrossKeys.kv`` (the call's, or ``generate``'s for all steps).

Hooks of block ``l``: ``hook_resid_pre``, ``ln_cross.hook_{scale,normalized}``, ``cross_attn.hook_q`` [batch, pos,
head, d_head] (after ``q_norm``), ``cross_attn.hook_k`` / ``hook_v`` [batch, keys, kv_head, d_head] (keys after
``k_norm``), ``cross_attn.hook_attn_scores`` / ``hook_pattern`` [batch, head, pos, keys] (masked),
``cross_attn.hook_z``, ``hook_attn_gate`` [batch, pos, 1] (``tanh(gate)``, 0 for rows without images),
``hook_cross_attn_out`` (what the attention adds, after the gate), ``hook_resid_mid``, ``ln2.*``, ``mlp.*``,
``hook_mlp_gate`` [batch, pos, 1] (``tanh(gate)``, 0 where the query reads no tile), ``hook_mlp_out`` (after the
gate), ``hook_resid_post``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import nn
from transformer_lens.components import GatedMLP, RMSNorm, RMSNormPre
from transformer_lens.config import HookedTransformerConfig
from transformer_lens.hook_points import HookPoint

from vlm_lens.context import CALL

CROSS = "mllama_cross"  # key of the CrossKeys in CallContext.side_outputs


@dataclass
class CrossKeys:
    """The key axis of a batch: row ``b`` holds its images' keys first (image ``j`` at ``j * keys_per_image``),
    then padding up to ``max_images * keys_per_image``."""

    images_per_row: list[int]
    keys_per_image: int
    tiles: int  # tile slots per image
    tile_mask: Bool[torch.Tensor, "batch prompt_pos tile_slots"]  # the processor's cross_attention_mask, flattened
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # per block, computed once

    @property
    def n_keys(self) -> int:
        return self.tile_mask.shape[-1] // self.tiles * self.keys_per_image

    def states(self, embeds: Float[torch.Tensor, "total_keys d_model"]) -> Float[torch.Tensor, "batch keys d_model"]:
        """Flattened ``hook_image_embeds`` (images in order, each row's after the previous row's) -> per row."""
        batch, n_keys = len(self.images_per_row), self.n_keys
        out = embeds.new_zeros(batch, n_keys, embeds.shape[-1])
        start = 0
        for b, n in enumerate(self.images_per_row):
            size = n * self.keys_per_image
            out[b, :size] = embeds[start:start + size]
            start += size
        return out

    def key_valid(self, device: torch.device) -> Bool[torch.Tensor, "batch keys"]:
        keys = torch.arange(self.n_keys, device=device)
        counts = torch.tensor(self.images_per_row, device=device) * self.keys_per_image
        return keys[None, :] < counts[:, None]

    def allowed(self, offset: int, n_queries: int, device: torch.device) -> Bool[torch.Tensor, "batch pos keys"]:
        """Keys each query may read by the processor's mask; queries past the prompt use its last row."""
        rows = torch.arange(offset, offset + n_queries).clamp(max=self.tile_mask.shape[1] - 1)
        tiles = self.tile_mask[:, rows].to(device=device, dtype=torch.bool)
        return tiles.repeat_interleave(self.keys_per_image // self.tiles, dim=-1)


def _norm(cfg: HookedTransformerConfig, length: int | None = None) -> nn.Module:
    """TransformerLens's RMS norm, or its weightless form once ``fold_ln`` has folded the weight in."""
    return RMSNormPre(cfg) if cfg.normalization_type == "RMSPre" else RMSNorm(cfg, length)


class CrossAttention(nn.Module):
    """Queries from the residual stream, keys and values from the image states, no rotary; q/k RMS norms."""

    def __init__(self, cfg: HookedTransformerConfig):
        super().__init__()
        h, kv, d, dh = cfg.n_heads, cfg.n_key_value_heads or cfg.n_heads, cfg.d_model, cfg.d_head
        self.cfg = cfg
        self.W_Q = nn.Parameter(torch.empty(h, d, dh, dtype=cfg.dtype))
        self.W_K = nn.Parameter(torch.empty(kv, d, dh, dtype=cfg.dtype))
        self.W_V = nn.Parameter(torch.empty(kv, d, dh, dtype=cfg.dtype))
        self.W_O = nn.Parameter(torch.empty(h, dh, d, dtype=cfg.dtype))
        self.q_norm, self.k_norm = RMSNorm(cfg, dh), RMSNorm(cfg, dh)
        self.hook_q, self.hook_k, self.hook_v, self.hook_z = HookPoint(), HookPoint(), HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()

    def keys_values(self, states: Float[torch.Tensor, "batch keys d_model"]) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.hook_k(self.k_norm(torch.einsum("bkd,ndh->bknh", states, self.W_K)))
        v = self.hook_v(torch.einsum("bkd,ndh->bknh", states, self.W_V))
        return k, v

    def forward(self, x: Float[torch.Tensor, "batch pos d_model"], k: torch.Tensor, v: torch.Tensor,
                additive_mask: Float[torch.Tensor, "batch 1 pos keys"]) -> Float[torch.Tensor, "batch pos d_model"]:
        q = self.hook_q(self.q_norm(torch.einsum("bpd,ndh->bpnh", x, self.W_Q)))
        repeat = self.cfg.n_heads // k.shape[2]
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
        scores = torch.einsum("bqnh,bknh->bnqk", q, k) * self.cfg.d_head**-0.5 + additive_mask
        pattern = self.hook_pattern(torch.softmax(self.hook_attn_scores(scores), dim=-1))
        z = self.hook_z(torch.einsum("bnqk,bknh->bqnh", pattern, v))
        return torch.einsum("bqnh,nhd->bqd", z, self.W_O)


class CrossAttentionBlock(nn.Module):
    """Block ``layer`` of the language model when it is one of ``cross_attention_layers``."""

    def __init__(self, cfg: HookedTransformerConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        # Named ln_cross (not ln1): fold_ln folds only a norm into the queries it feeds, and this one feeds queries
        # alone (keys and values read the image); it keeps its weight so processed weights stay exact.
        self.ln_cross = RMSNorm(cfg)
        self.cross_attn = CrossAttention(cfg)
        self.attn_gate = nn.Parameter(torch.empty(1, dtype=cfg.dtype))
        self.ln2 = _norm(cfg)
        self.mlp = GatedMLP(cfg)
        self.mlp_gate = nn.Parameter(torch.empty(1, dtype=cfg.dtype))
        for name in ("resid_pre", "attn_gate", "cross_attn_out", "resid_mid", "mlp_gate", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, resid_pre: Float[torch.Tensor, "batch pos d_model"], shortformer_pos_embed=None,
                past_kv_cache_entry=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)
        call = CALL.get()
        keys: CrossKeys | None = None if call is None else call.side_outputs.get(CROSS)
        if keys is None or call.image_embeds is None:
            return self.hook_resid_post(resid_pre)  # no image in this batch: HF skips the layer
        batch, n_queries = resid_pre.shape[:2]
        device = resid_pre.device
        offset = 0 if attention_mask is None else attention_mask.shape[1] - n_queries
        if self.layer not in keys.kv:
            states = keys.states(call.image_embeds.to(device=device, dtype=resid_pre.dtype))
            keys.kv[self.layer] = self.cross_attn.keys_values(states)
        k, v = keys.kv[self.layer]
        valid = keys.key_valid(device)
        allowed = keys.allowed(offset, n_queries, device) & valid[:, None, :]
        reads = allowed.any(-1)  # [batch, pos]: the query reads at least one tile
        effective = torch.where(reads[..., None], allowed, valid[:, None, :])
        additive = torch.zeros(effective.shape, dtype=resid_pre.dtype, device=device)
        additive = additive.masked_fill(~effective, torch.finfo(resid_pre.dtype).min)[:, None]
        attn = self.cross_attn(self.ln_cross(resid_pre), k, v, additive)
        has_image = valid.any(-1)[:, None, None].to(resid_pre.dtype).expand(batch, n_queries, 1)
        attn_gate = self.hook_attn_gate(self.attn_gate.tanh() * has_image)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_cross_attn_out(attn_gate * attn))
        mlp_gate = self.hook_mlp_gate(self.mlp_gate.tanh() * reads[..., None].to(resid_pre.dtype))
        mlp_out = self.hook_mlp_out(mlp_gate * self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out)
