"""Attention knockout: stop chosen query positions from reading chosen key positions.

Sets ``hook_attn_scores`` to -inf at the (query, key) pairs, in chosen layers and heads, in the
language model or the vision tower. Scores are per query head, so grouped-query models are handled.
During cached generation the query axis holds only the new tokens; absolute query positions are
mapped onto it, so the knockout also applies to generated tokens listed in ``query_positions``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from vlm_lens.analysis.positions import per_row, require_absolute
from vlm_lens.hook_names import Tower, act_names

Hook = tuple[str, Callable]

# Neo et al. (2024) windows for LLaVA-1.5-7B's 32 layers, [start, end) - scaled to other depths.
PAPER_WINDOWS = {"early": (0, 10), "early-mid": (5, 15), "mid": (11, 21), "mid-late": (15, 25), "late": (21, 32)}


def layer_window(name: str, n_layers: int) -> list[int]:
    """Layers of a named window (``"all"`` or one of ``PAPER_WINDOWS``) scaled to ``n_layers``."""
    if name == "all":
        return list(range(n_layers))
    if name not in PAPER_WINDOWS:
        raise ValueError(f"unknown window {name!r}; use 'all' or one of {sorted(PAPER_WINDOWS)}.")
    start, end = PAPER_WINDOWS[name]
    lo = min(round(start * n_layers / 32), n_layers - 1)
    hi = max(round(end * n_layers / 32), lo + 1)
    return list(range(lo, min(hi, n_layers)))


def sliding_windows(n_layers: int, size: int, stride: int = 1) -> list[list[int]]:
    """All windows of ``size`` consecutive layers, e.g. size 3 over 5 layers -> [0,1,2], [1,2,3], [2,3,4]."""
    if not 1 <= size <= n_layers:
        raise ValueError(f"window size {size} must be between 1 and n_layers={n_layers}.")
    return [list(range(s, s + size)) for s in range(0, n_layers - size + 1, stride)]


def knockout_hooks(query_positions: Any, key_positions: Any, layers: Sequence[int] | str = "all", *,
                   n_layers: int | None = None, heads: Sequence[int] | None = None,
                   tower: Tower = "lm") -> list[Hook]:
    """Hooks that block attention from ``query_positions`` to ``key_positions``.

    Positions are absolute, >= 0 (one tensor for every batch row, e.g. ``layout.grid(i)``, or a list with one
    per row; positions past the end of a call are skipped, so later generated tokens can be listed); ``layers`` is
    a list or a window name (then ``n_layers`` is needed); ``heads=None`` means all heads.

    Example:
        >>> last, image = inputs.tokens.shape[1] - 1, inputs.layout.grid(0).flatten()
        >>> hooks = knockout_hooks([last], image, "all", n_layers=model.cfg.n_layers)  # hide the image
        >>> model.to_string(model.run_with_hooks(inputs, fwd_hooks=hooks)[0, -1].argmax())  # was 'blue'
        'red'
    """
    require_absolute(query_positions, "query_positions")
    require_absolute(key_positions, "key_positions")
    if isinstance(layers, str):
        if n_layers is None:
            raise ValueError("a named layer window needs n_layers=model.cfg.n_layers.")
        layers = layer_window(layers, n_layers)
    head_index = None if heads is None else torch.as_tensor(list(heads), dtype=torch.long)

    def hook(scores: torch.Tensor, hook: Any) -> torch.Tensor:
        batch, _, n_q, n_k = scores.shape
        offset = n_k - n_q  # queries are the last n_q positions
        mask = torch.zeros(batch, n_q, n_k, dtype=torch.bool, device=scores.device)
        for b, (q, k) in enumerate(zip(per_row(query_positions, batch), per_row(key_positions, batch))):
            q = q[(q >= offset) & (q < n_k)] - offset
            k = k[k < n_k]
            if len(q) and len(k):
                mask[b, q[:, None], k[None, :]] = True
        heads_mask = torch.ones(scores.shape[1], dtype=torch.bool, device=scores.device)
        if head_index is not None:
            heads_mask = torch.zeros_like(heads_mask)
            heads_mask[head_index] = True
        full = mask[:, None] & heads_mask[None, :, None, None]
        return scores.masked_fill(full, float("-inf"))

    return [(name, hook) for name in act_names("attn_scores", layers, tower)]
