"""The one place that reads meaning from hook names: which hooks are in the language model's sequence."""

from __future__ import annotations

# Hooks whose activations are [batch, pos, ...] over the language model's sequence. Vision-side hooks
# (``vision.*``, ``hook_image_features``, ``projector.*``, ``hook_image_embeds``) are
# [n_images, n_tokens, ...], and attention patterns/scores are [batch, head, query, key].
_SEQUENCE_PREFIXES = ("blocks.", "hook_embed", "hook_pos_embed", "ln_final.", "unembed.")
_NOT_SEQUENCE_SUFFIXES = ("hook_pattern", "hook_attn_scores")


def is_sequence_hook(name: str) -> bool:
    """Whether ``name``'s activations are laid out as [batch, pos, ...] over the input sequence."""
    return name.startswith(_SEQUENCE_PREFIXES) and not name.endswith(_NOT_SEQUENCE_SUFFIXES)
