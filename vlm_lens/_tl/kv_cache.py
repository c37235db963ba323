"""The fields of TransformerLens's key-value cache that vlm_lens reads."""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache


def new_cache(cfg: Any, device: Any, batch: int) -> TransformerLensKeyValueCache:
    return TransformerLensKeyValueCache.init_cache(cfg, device, batch)


def cached_length(cache: Any) -> int:
    """Positions already in ``cache`` (0 for None or an empty cache)."""
    return 0 if cache is None else int(cache.entries[0].past_keys.shape[1])


def previous_attention_mask(cache: Any) -> torch.Tensor:
    """[batch, cached_pos] attention mask of the cached positions."""
    return cache.previous_attention_mask
