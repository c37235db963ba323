"""TransformerLens attention with a fused kernel while nobody looks at the pattern.

``FastAttention`` / ``FastGroupedQueryAttention`` are TransformerLens's ``Attention`` /
``GroupedQueryAttention`` with three changes, none visible to hooks:

* Q, K and V are projected without copying a weight: with one GEMM, as Hugging Face's ``q_proj``, where the
  ``[head, d_model, d_head]`` weight is a view of HF's ``[head * d_head, d_model]`` storage (the loaders
  keep it), else head by head; ``W_O`` is read as a ``[head * d_head, d_model]`` view.
* While no hook is attached to ``hook_attn_scores`` or ``hook_pattern`` (the only two hook points the
  fused kernel never materialises), attention runs in ``F.scaled_dot_product_attention``. Attach one
  (``run_with_hooks``, ``run_with_cache``, a backward hook) and that layer computes the scores and the
  pattern explicitly, exactly as TransformerLens does, for as long as the hook stays.
* Configurations this module does not know (ALiBi, soft-capping, attention sinks, 4-bit weights, ...)
  use TransformerLens's own ``forward`` unchanged.

``hook_q/k/v``, ``hook_rot_q/k``, ``hook_z`` and ``hook_result`` fire on both paths, with the same
shapes and values (up to float rounding).
"""

from __future__ import annotations

import einops
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from transformer_lens.components import AbstractAttention, Attention, GroupedQueryAttention
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import get_offset_position_ids

from vlm_lens._tl.fast.linear import addmm, nonzero_bias
from vlm_lens.rotary import rotate_half

_OLMO = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def has_any_hook(point: nn.Module) -> bool:
    """Whether running ``point`` would do anything: its own or torch's global module hooks, or a module that
    is not a plain ``HookPoint`` put in its place (e.g. SAE Lens's SAE wrapper), which must always run."""
    if type(point) is not HookPoint:
        return True
    return bool(
        point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
        or point._backward_pre_hooks or torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
    )


def supports_fast_path(cfg) -> bool:
    """Configurations whose attention this module reproduces; the rest use TransformerLens's forward."""
    return (
        cfg.positional_embedding_type in ("standard", "rotary", "shortformer")
        and not cfg.load_in_4bit
        and not cfg.use_qk_norm
        and cfg.original_architecture not in _OLMO
        and cfg.clip_qkv is None
        and not cfg.use_logn_attn
        and not cfg.use_attention_sinks
        and not (cfg.attn_scores_soft_cap and cfg.attn_scores_soft_cap > 0)
    )


def project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, d_model] x [head, d_model, d_head] -> [batch, pos, head, d_head]`` without copying
    the weight.

    Weights kept in Hugging Face's layout (``[head * d_head, d_model]`` storage, which the loaders keep)
    are one ``[d_model, head * d_head]`` matrix: one GEMM, as HF's ``q_proj`` does. Otherwise one GEMM per
    head over a broadcast (stride-0) input, whose result is a permuted view of a ``[head, batch, pos,
    d_head]`` buffer."""
    batch, pos, d_model = x.shape
    n_heads, _, d_head = weight.shape
    if weight.device != x.device:
        weight, bias = weight.to(x.device), bias.to(x.device)
    matrix, bias = _heads_as_matrix(weight), nonzero_bias(bias)
    if matrix is not None:
        flat = x.reshape(batch * pos, d_model)
        out = torch.mm(flat, matrix) if bias is None else torch.addmm(bias.reshape(-1), flat, matrix)
        return out.view(batch, pos, n_heads, d_head)
    flat = x.reshape(1, batch * pos, d_model).expand(n_heads, -1, -1)
    out = torch.bmm(flat, weight) if bias is None else torch.baddbmm(bias[:, None, :], flat, weight)
    return out.view(n_heads, batch, pos, d_head).permute(1, 2, 0, 3)


def _heads_as_matrix(weight: torch.Tensor) -> torch.Tensor | None:
    """``[head, d_model, d_head]`` as a ``[d_model, head * d_head]`` view, or None where its strides allow
    none (TransformerLens's own contiguous layout: a GEMM per head then reads it in place instead)."""
    try:
        return weight.permute(1, 0, 2).view(weight.shape[1], -1)
    except RuntimeError:
        return None


def _version(t: torch.Tensor) -> int | None:
    """The in-place edit counter, or None for inference tensors (which do not keep one)."""
    return None if t.is_inference() else t._version


class FastAttentionMixin(AbstractAttention):
    """The shared forward; mixed in before ``Attention`` or ``GroupedQueryAttention``. It derives from
    their common base so that its instances keep their layout and ``module.__class__`` can be swapped."""

    def _kv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.W_K, self.b_K, self.W_V, self.b_V

    def _pattern_is_watched(self) -> bool:
        return has_any_hook(self.hook_attn_scores) or has_any_hook(self.hook_pattern)

    def calculate_qkv_matrices(self, query_input, key_input, value_input):
        if query_input.ndim != 3 or key_input.ndim != 3 or not supports_fast_path(self.cfg):
            return super().calculate_qkv_matrices(query_input, key_input, value_input)
        W_K, b_K, W_V, b_V = self._kv_weights()
        q = self.hook_q(project_heads(query_input, self.W_Q, self.b_Q))
        k = self.hook_k(project_heads(key_input, W_K, b_K))
        v = self.hook_v(project_heads(value_input, W_V, b_V))
        return q, k, v

    def rotate_every_two(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.rotary_adjacent_pairs:
            return super().rotate_every_two(x)
        return rotate_half(x)  # the same values as TransformerLens's clone + two slice writes

    def apply_rotary(self, x: torch.Tensor, past_kv_pos_offset: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """TransformerLens's rotary embedding, minus its final concatenation with an empty pass-through
        slice when every dimension rotates (a copy of q and k per layer)."""
        if self.cfg.rotary_dim != x.shape[-1] or self.cfg.use_dynamic_ntk_rope:
            return super().apply_rotary(x, past_kv_pos_offset, attention_mask)
        if x.device != self.rotary_sin.device:
            x = x.to(self.rotary_sin.device)
        needed = past_kv_pos_offset + x.size(1)
        if needed > self.rotary_cos.shape[0]:
            self._extend_rotary_embeddings(min(self.cfg.n_ctx, max(needed, 2 * self.rotary_cos.shape[0])))
        if attention_mask is None:
            cos = self.rotary_cos[None, past_kv_pos_offset:needed, None, :]
            sin = self.rotary_sin[None, past_kv_pos_offset:needed, None, :]
        else:
            ids = get_offset_position_ids(past_kv_pos_offset, attention_mask).to(self.rotary_cos.device)
            cos, sin = self.rotary_cos[ids, None, :], self.rotary_sin[ids, None, :]
        return x * cos + self.rotate_every_two(x) * sin

    def forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        if (not supports_fast_path(self.cfg) or additive_attention_mask is not None
                or position_bias is not None):
            return super().forward(query_input, key_input, value_input, past_kv_cache_entry,
                                   additive_attention_mask, attention_mask, position_bias)
        if attention_mask is not None and attention_mask.device.type == "cpu" and bool(attention_mask.all()):
            attention_mask = None  # no padding: the same positions and masking without it (free on CPU)
        q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
        offset, cached_keys = 0, None
        if past_kv_cache_entry is not None:
            offset, cached_keys = past_kv_cache_entry.past_keys.size(1), past_kv_cache_entry.past_keys
            k, v = past_kv_cache_entry.append(k, v)
        if self.cfg.positional_embedding_type == "rotary":
            q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
            k = self.hook_rot_k(self._rotate_keys(k, offset, attention_mask, past_kv_cache_entry, cached_keys))
        if self._pattern_is_watched():
            z = self._explicit_z(q, k, v, offset, attention_mask)
        else:
            z = self.hook_z(self._fused_z(q, k, v, offset, attention_mask))
        return self._project_out(z)

    def _rotate_keys(self, k, offset, attention_mask, entry, cached_keys):
        """All keys rotated, as TransformerLens computes them every step (its cache holds keys before
        rotation, and ``hook_rot_k`` sees every key). The keys rotated on the previous step are kept on
        the cache entry, so only the new ones are rotated; the positions of old keys never change, so the
        values are the same. Hook edits are not kept: the copy is stored before ``hook_rot_k`` runs.
        Replacing ``entry.past_keys`` (or editing it in place outside inference mode, where tensors have
        version counters) drops the copy."""
        memo = getattr(entry, "_vlm_lens_rotated_keys", None) if entry is not None else None
        if (memo is not None and memo[0] is cached_keys and memo[1] == _version(cached_keys)
                and memo[2].shape[1] == offset and not self.cfg.use_dynamic_ntk_rope):
            rotated = torch.cat([memo[2], self.apply_rotary(k[:, offset:], offset, attention_mask)], dim=1)
        else:
            rotated = self.apply_rotary(k, 0, attention_mask)
        if entry is not None and not entry.frozen:
            entry._vlm_lens_rotated_keys = (entry.past_keys, _version(entry.past_keys), rotated)
        return rotated

    def _is_causal(self) -> bool:
        return (self._attention_dir_override or self.cfg.attention_dir) == "causal"

    def _explicit_z(self, q, k, v, offset, attention_mask):
        """TransformerLens's own computation, for when the scores or the pattern are hooked."""
        scores = self.calculate_attention_scores(q, k)  # [batch, head, query_pos, key_pos]
        if self._is_causal():
            scores = self.apply_causal_mask(scores, offset, attention_mask)
        scores = self.hook_attn_scores(scores)
        pattern = F.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = self.hook_pattern(pattern).to(device=v.device, dtype=v.dtype)
        return self.calculate_z_scores(v, pattern)  # fires hook_z

    def _fused_z(self, q, k, v, offset, attention_mask):
        """``scaled_dot_product_attention`` with TransformerLens's masking; [batch, pos, head, d_head]."""
        q_len, k_len = q.shape[1], k.shape[1]
        mask, is_causal, empty_rows = None, False, None
        if self._is_causal():
            if attention_mask is None and self.attn_type == "global" and offset == 0 and q_len == k_len:
                is_causal = True
            elif attention_mask is not None or self.attn_type != "global" or q_len > 1:
                mask = self._make_causal_mask(q_len, k_len, offset, q.device)
                if attention_mask is not None:
                    mask = mask & attention_mask[:, None, None, :].to(device=q.device, dtype=torch.bool)
                    # A query that may attend to nothing (left padding) gets z = 0, as in TransformerLens.
                    empty_rows = ~mask.any(dim=-1, keepdim=True)
                    mask = mask | empty_rows
        gqa = k.shape[2] != q.shape[2]
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
            attn_mask=mask, is_causal=is_causal, scale=1.0 / self.attn_scale, enable_gqa=gqa,
        )  # [batch, head, query_pos, d_head]
        if empty_rows is not None:
            z = z.masked_fill(empty_rows, 0.0)
        return z.transpose(1, 2)

    def _project_out(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ W_O + b_O`` reading ``W_O`` as a view, or per head through ``hook_result``."""
        W_O, b_O = self.W_O, self.b_O
        if W_O.device != z.device:
            W_O, b_O = W_O.to(z.device), b_O.to(z.device)
        z = z.to(W_O.dtype)
        if self.cfg.use_attn_result:
            result = self.hook_result(einops.einsum(
                z, W_O, "batch pos head d_head, head d_head d_model -> batch pos head d_model"))
            return result.sum(dim=-2) + b_O
        batch, pos = z.shape[:2]
        return addmm(b_O, W_O.reshape(-1, W_O.shape[-1]), z.reshape(batch, pos, -1))


class FastAttention(FastAttentionMixin, Attention):
    """``transformer_lens.components.Attention`` with the fused path (see the module docstring)."""


class FastGroupedQueryAttention(FastAttentionMixin, GroupedQueryAttention):
    """``GroupedQueryAttention`` with the fused path; keys and values stay grouped."""

    def _kv_weights(self):
        if self.cfg.ungroup_grouped_query_attention:
            return self.W_K, self.b_K, self.W_V, self.b_V
        return self._W_K, self._b_K, self._W_V, self._b_V
