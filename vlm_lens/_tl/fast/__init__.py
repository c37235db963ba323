"""Faster drop-in subclasses of TransformerLens components (same hooks, parameters and state dict).

``install_fast_components(model)`` swaps, in place, every module whose type is exactly one of
TransformerLens's ``Attention``, ``GroupedQueryAttention``, ``GatedMLP``, ``Unembed``,
``TransformerBlock`` or a normalisation for the subclass here, by changing its ``__class__`` (no
parameter is copied or re-created). What each subclass changes, and when it falls back to
TransformerLens's own code, is in its module's docstring. ``HookedVLM``
calls it on itself, so the language model and the vision tower both run the fast components;
``uninstall_fast_components`` puts TransformerLens's classes back (used by the benchmarks and tests
to compare against the unmodified path).

Example:
    >>> from vlm_lens._tl.fast import install_fast_components, uninstall_fast_components
    >>> type(model.blocks[0]).__name__
    'FastTransformerBlock'
    >>> swapped = uninstall_fast_components(model)  # TransformerLens's own classes
    >>> type(model.blocks[0]).__name__, install_fast_components(model) == swapped
    ('TransformerBlock', True)
"""

from __future__ import annotations

from torch import nn
from transformer_lens.components import (
    Attention,
    GatedMLP,
    GroupedQueryAttention,
    LayerNorm,
    LayerNormPre,
    RMSNorm,
    RMSNormPre,
    TransformerBlock,
    Unembed,
)

from vlm_lens._tl.fast.attention import (
    FastAttention,
    FastGroupedQueryAttention,
    has_any_hook,
    supports_fast_path,
)
from vlm_lens._tl.fast.block import FastTransformerBlock
from vlm_lens._tl.fast.linear import FastGatedMLP, FastUnembed
from vlm_lens._tl.fast.norms import FastLayerNorm, FastLayerNormPre, FastRMSNorm, FastRMSNormPre

FAST_CLASSES: dict[type, type] = {
    Attention: FastAttention,
    GroupedQueryAttention: FastGroupedQueryAttention,
    GatedMLP: FastGatedMLP,
    Unembed: FastUnembed,
    TransformerBlock: FastTransformerBlock,
    LayerNorm: FastLayerNorm,
    LayerNormPre: FastLayerNormPre,
    RMSNorm: FastRMSNorm,
    RMSNormPre: FastRMSNormPre,
}


def _swap(model: nn.Module, mapping: dict[type, type]) -> int:
    count = 0
    for module in model.modules():
        new_class = mapping.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
            count += 1
    return count


def install_fast_components(model: nn.Module) -> int:
    """Swap TransformerLens components for their fast subclasses; returns how many were swapped."""
    return _swap(model, FAST_CLASSES)


def uninstall_fast_components(model: nn.Module) -> int:
    """Undo ``install_fast_components``; returns how many modules were swapped back."""
    return _swap(model, {fast: plain for plain, fast in FAST_CLASSES.items()})


__all__ = [
    "FAST_CLASSES", "FastAttention", "FastGatedMLP", "FastGroupedQueryAttention", "FastLayerNorm",
    "FastLayerNormPre", "FastRMSNorm", "FastRMSNormPre", "FastTransformerBlock", "FastUnembed",
    "has_any_hook", "install_fast_components", "supports_fast_path", "uninstall_fast_components",
]
