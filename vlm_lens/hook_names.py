"""The one place that builds hook names from strings.

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
