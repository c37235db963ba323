"""The one place that builds hook names from strings, and reads what kind of activation a name holds.

Hook points take their names from where they sit in the module tree (``HookedTransformer.setup``); code
that must name a hook before a forward pass (analysis tools, views, caches with ``names_filter``) builds
the name here, from TransformerLens's own ``get_act_name`` so language-model names stay exactly
TransformerLens's, with the ``vision.`` prefix for the vision tower.
"""

from __future__ import annotations

from typing import Literal

from transformer_lens.utilities import get_act_name

Tower = Literal["lm", "vision"]
VISION_PREFIX = "vision."
IMAGE_FEATURES, IMAGE_EMBEDS, EMBED = "hook_image_features", "hook_image_embeds", "hook_embed"


def act_name(name: str, layer: int, tower: Tower = "lm") -> str:
    """``act_name("pattern", 3)`` -> ``blocks.3.attn.hook_pattern``; ``tower="vision"`` -> ``vision.blocks.3...``."""
    if tower not in ("lm", "vision"):
        raise ValueError(f"tower={tower!r}; use 'lm' (the language model) or 'vision' (the vision tower).")
    full = get_act_name(name, layer)
    return full if tower == "lm" else VISION_PREFIX + full


def act_names(name: str, layers: range | list[int], tower: Tower = "lm") -> list[str]:
    return [act_name(name, layer, tower) for layer in layers]


def cross_attn_name(name: str, layer: int) -> str:
    """``cross_attn_name("attn_scores", 3)`` -> ``blocks.3.cross_attn.hook_attn_scores`` (cross-attention
    blocks of models that read images through cross-attention)."""
    return f"blocks.{layer}.cross_attn.hook_{name}"


# Language-model hooks: their activations run over the input sequence, at dimension 1 ([batch, pos, ...]) or,
# for attention scores and patterns, 2 ([batch, head, query_pos, key_pos]). Every other hook is image-side
# (``vision.*``, ``projector.*``, ``hook_image_features``, ``hook_image_embeds``, a family's own modules).
LM_HOOK_PREFIXES = ("hook_embed", "hook_pos_embed", "hook_tokens", "blocks.", "ln_final.", "unembed.")
PAIRWISE_SUFFIXES = ("hook_attn_scores", "hook_pattern")


def is_sequence_hook(name: str, key_axis_hooks: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is a language-model hook with a sequence-position dimension; ``key_axis_hooks``: name
    fragments of a pipeline's hooks whose dimension 1 indexes image keys instead (cross-attention)."""
    return name.startswith(LM_HOOK_PREFIXES) and not any(part in name for part in key_axis_hooks)


def position_dim(name: str) -> int:
    """The sequence-position dimension of a language-model hook's activation (with its batch dimension)."""
    return 2 if name.endswith(PAIRWISE_SUFFIXES) else 1
