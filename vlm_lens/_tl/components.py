"""Class swaps and attention overrides that depend on TransformerLens's internal method signatures.

- ``swap_class``: change a module's class in place (no parameter copied), for subclasses that add no state.
- ``with_external_rotary``: a TransformerLens attention layer whose rotary embedding is computed by a
  function of the family (e.g. multimodal rotary positions) instead of TransformerLens's 1-D tables.
- ``MaskedRotaryAttention``: a bidirectional TransformerLens ``Attention`` whose rotary embedding and
  additive mask come from functions (e.g. a vision tower with 2-D rotary and window masks).
- ``ResidualTermBlock``: a TransformerLens ``TransformerBlock`` whose output has one more term, defined by a
  subclass (e.g. Qwen3-VL's deepstack features added to the first layers' residual stream).

Every hook (``hook_q``, ``hook_rot_q``, ``hook_attn_scores``, ``hook_pattern``, ``hook_z``, ...) keeps its
name, shape and place: only the rotary and the mask change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformer_lens.components import AbstractAttention, Attention, TransformerBlock

# (x [batch, pos, head, d_head], offset of x's first position among the keys) -> rotated x, or None to
# use TransformerLens's own rotary (e.g. outside the forward pass that provides positions).
Rotary = Callable[[torch.Tensor, int], "torch.Tensor | None"]


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
