"""Class swaps and attention overrides that depend on TransformerLens's internal method signatures.

- ``swap_class``: change a module's class in place (no parameter copied), for subclasses that add no state.
- ``with_external_rotary``: a TransformerLens attention layer whose rotary embedding is computed by a
  function of the family (e.g. multimodal rotary positions) instead of TransformerLens's 1-D tables.
- ``MaskedRotaryAttention``: a bidirectional TransformerLens ``Attention`` whose rotary embedding and
  additive mask come from functions (e.g. a vision tower with 2-D rotary and window masks).
- ``ResidualTermBlock``: a TransformerLens ``TransformerBlock`` whose output has one more term, defined by a
  subclass (e.g. deepstack features from the vision tower added to the first layers' residual stream).
- ``shared_rotary_tables``: while a model is built, its attention layers share one rotary sin/cos table
  (TransformerLens computes the same table once per layer: most of ``HookedTransformer.__init__``'s time).
- ``with_attention_overlay``: a causal TransformerLens attention layer that also lets chosen (query, key)
  pairs attend, given per call by a function of the family (e.g. an image's tokens attending to each other
  in both directions, or a prefix-LM prompt).

Every hook (``hook_q``, ``hook_rot_q``, ``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ...) keeps its
name, shape and place: only the rotary and the mask change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformer_lens.components import AbstractAttention, Attention, TransformerBlock

# (x [batch, pos, head, d_head], offset of x's first position among the keys) -> rotated x, or None to
# use TransformerLens's own rotary (e.g. outside the forward pass that provides positions).
Rotary = Callable[[torch.Tensor, int], "torch.Tensor | None"]


@contextmanager
def shared_rotary_tables() -> Iterator[None]:
    """Layers built inside this context with the same config, size, base and dtype share one rotary table.

    The tables are buffers that TransformerLens only ever replaces (never edits in place), so sharing
    them changes no value; ``.to(device)`` gives each layer its own copy on the device.
    """
    original = AbstractAttention.calculate_sin_cos_rotary
    memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def shared(self, rotary_dim, n_ctx, base=10000, dtype=torch.float32):
        key = (id(self.cfg), rotary_dim, n_ctx, base, dtype)
        if key not in memo:
            memo[key] = original(self, rotary_dim, n_ctx, base=base, dtype=dtype)
        return memo[key]

    AbstractAttention.calculate_sin_cos_rotary = shared
    try:
        yield
    finally:
        AbstractAttention.calculate_sin_cos_rotary = original


def swap_class(module: nn.Module, new_class: type) -> None:
    """Turn ``module`` into an instance of ``new_class`` (a subclass of its class that adds no state)."""
    if not issubclass(new_class, type(module)) and not issubclass(type(module), new_class):
        raise TypeError(f"cannot swap a {type(module).__name__} for the unrelated {new_class.__name__}.")
    module.__class__ = new_class


class _ExternalRotary(AbstractAttention):
    """Mixin: ``apply_rotary`` asks ``self.external_rotary`` first."""

    external_rotary: Rotary

    def apply_rotary(self, x: torch.Tensor, past_kv_pos_offset: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.external_rotary(x, past_kv_pos_offset)
        return super().apply_rotary(x, past_kv_pos_offset, attention_mask) if out is None else out


_ROTARY_CLASSES: dict[type, type] = {}


def with_external_rotary(attn: AbstractAttention, rotary: Rotary) -> None:
    """Make ``attn`` (any TransformerLens attention) rotate queries and keys with ``rotary``."""
    base = type(attn)
    if base not in _ROTARY_CLASSES:
        _ROTARY_CLASSES[base] = type(f"{base.__name__}WithExternalRotary", (_ExternalRotary, base), {})
    swap_class(attn, _ROTARY_CLASSES[base])
    attn.external_rotary = rotary


class MaskedRotaryAttention(Attention):
    """Bidirectional ``Attention`` with rotary and additive mask supplied per call by two functions.

    ``rotary(x, offset)`` returns the rotated queries or keys; ``mask()`` returns an additive mask
    broadcastable to [batch, head, query_pos, key_pos] (0 or -inf), or None.
    """

    def __init__(self, cfg, layer_id: int, rotary: Rotary, mask: Callable[[], torch.Tensor | None]):
        super().__init__(cfg, "global", layer_id)
        self.rotary_fn, self.mask_fn = rotary, mask  # plain callables (TL's attention has a buffer named mask)

    def apply_rotary(self, x: torch.Tensor, past_kv_pos_offset: int = 0,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.rotary_fn(x, past_kv_pos_offset)

    def forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                additive_attention_mask=None, attention_mask=None, position_bias=None):
        return super().forward(query_input, key_input, value_input, additive_attention_mask=self.mask_fn())


class ResidualTermBlock(TransformerBlock):
    """A ``TransformerBlock`` with ``resid_post = resid_mid + mlp_out + residual_term(mlp_out)``.

    Subclasses define ``residual_term`` (None: nothing added). The term is added in ``apply_mlp``,
    TransformerLens's last step before ``hook_resid_post``, so ``hook_mlp_out`` stays the MLP's own output and
    ``hook_resid_post`` (the next block's ``hook_resid_pre``) includes the term.
    """

    def residual_term(self, mlp_out: torch.Tensor) -> torch.Tensor | None:
        return None

    def apply_mlp(self, normalized_resid: torch.Tensor) -> torch.Tensor:
        mlp_out = super().apply_mlp(normalized_resid)
        term = self.residual_term(mlp_out)
        return mlp_out if term is None else mlp_out + term


# (n_queries, n_keys, offset of the first query among the keys, device) -> bool [batch, 1, n_queries, n_keys]
# of the (query, key) pairs that may attend on top of the causal mask, or None for the plain causal mask.
Overlay = Callable[[int, int, int, torch.device], "torch.Tensor | None"]


class _AttentionOverlay(AbstractAttention):
    """Mixin: TransformerLens's causal mask, OR the pairs of ``self.attention_overlay``. On a local layer the
    window (``key > query - window_size``) limits the union when ``overlay_within_window`` (AND(window,
    OR(causal, overlay))), or only the causal part (OR(AND(window, causal), overlay)).

    The mask is applied before ``hook_attn_scores``, so hooks see (and may further mask) the scores the model
    uses; padding is still masked by TransformerLens's ``attention_mask`` after this.
    """

    attention_overlay: Overlay
    overlay_within_window: bool = True

    def _make_causal_mask(self, query_ctx_length: int, key_ctx_length: int, past_kv_pos_offset: int,
                          device: torch.device) -> torch.Tensor:
        extra = self.attention_overlay(query_ctx_length, key_ctx_length, past_kv_pos_offset, device)
        if extra is None:
            return super()._make_causal_mask(query_ctx_length, key_ctx_length, past_kv_pos_offset, device)
        queries = torch.arange(past_kv_pos_offset, past_kv_pos_offset + query_ctx_length, device=device)[:, None]
        keys = torch.arange(key_ctx_length, device=device)[None, :]
        extra = extra.to(device=device, dtype=torch.bool)
        mask = keys <= queries
        if self.attn_type == "local" and not self.overlay_within_window:
            return (mask & (keys > queries - self.cfg.window_size)) | extra
        mask = mask | extra
        if self.attn_type == "local":
            mask = mask & (keys > queries - self.cfg.window_size)
        return mask


_OVERLAY_CLASSES: dict[type, type] = {}


def with_attention_overlay(attn: AbstractAttention, overlay: Overlay, within_window: bool = True) -> None:
    """Make the causal layer ``attn`` (any TransformerLens attention) also attend over ``overlay``'s pairs;
    ``within_window=False`` lets the overlay reach past a local layer's sliding window.

    Call it while building the model (before ``install_fast_components``): the layer keeps TransformerLens's
    own forward (its class is no longer one the fast path swaps), so the scores and the pattern always hold
    the overlay, with or without hooks.
    """
    from vlm_lens._tl.fast.attention import FastAttentionMixin

    if isinstance(attn, FastAttentionMixin):
        raise TypeError("with_attention_overlay needs TransformerLens's own attention class; apply it while "
                        "building the model, before the fast components are installed.")
    base = type(attn)
    if base not in _OVERLAY_CLASSES:
        _OVERLAY_CLASSES[base] = type(f"{base.__name__}WithOverlay", (_AttentionOverlay, base), {})
    swap_class(attn, _OVERLAY_CLASSES[base])
    attn.attention_overlay = overlay
    attn.overlay_within_window = within_window


class _FullWidthQKNorm(AbstractAttention):
    """Mixin: queries and keys normalised over all heads together by ``self.q_norm`` / ``self.k_norm`` (norms of
    length ``n_heads * d_head``), after ``hook_q`` / ``hook_k`` as TransformerLens's own per-head qk-norm is."""

    def calculate_qkv_matrices(self, query_input, key_input, value_input):
        q, k, v = super().calculate_qkv_matrices(query_input, key_input, value_input)
        return self.q_norm(q.reshape(*q.shape[:-2], -1)).reshape(q.shape), \
            self.k_norm(k.reshape(*k.shape[:-2], -1)).reshape(k.shape), v


_QK_NORM_CLASSES: dict[type, type] = {}


def with_full_width_qk_norm(attn: AbstractAttention, q_norm: nn.Module, k_norm: nn.Module) -> None:
    """Make ``attn`` normalise its queries and keys over all heads at once (e.g. InternViT-6B's qk-norm); the
    norms become ``attn.q_norm`` / ``attn.k_norm`` (their hooks: ``attn.q_norm.hook_normalized``, ...)."""
    if attn.cfg.use_qk_norm:
        raise ValueError("this attention already has TransformerLens's per-head qk-norm (cfg.use_qk_norm=True).")
    base = type(attn)
    if base not in _QK_NORM_CLASSES:
        _QK_NORM_CLASSES[base] = type(f"{base.__name__}WithFullWidthQKNorm", (_FullWidthQKNorm, base), {})
    swap_class(attn, _QK_NORM_CLASSES[base])
    attn.q_norm, attn.k_norm = q_norm, k_norm
