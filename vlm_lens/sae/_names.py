"""Which hooks an SAE reads per sequence position (``vlm_lens.hook_names`` reads the names)."""

from __future__ import annotations

from vlm_lens import hook_names


def is_sequence_hook(name: str) -> bool:
    """Whether ``name``'s activations are laid out as [batch, pos, ...] over the input sequence (language-model
    hooks but attention scores and patterns, which are [batch, head, query, key])."""
    return hook_names.is_sequence_hook(name) and not name.endswith(hook_names.PAIRWISE_SUFFIXES)
