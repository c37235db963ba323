"""Position selectors: which sequence positions an intervention touches.

Every selector returns a LongTensor of sequence positions in one batch row (``layout.batch_of(image)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Int

from vlm_lens.layout import ImageLayout


def per_row(positions: Any, batch: int) -> list[Int[torch.Tensor, "n"]]:
    """One LongTensor of sequence positions per batch row, as every tool here takes them.

    A tensor (of any shape, e.g. ``layout.grid(i)``: flattened) or a list of ints applies to every row; a list
    (or tuple) of ``batch`` sequences gives each row its own, e.g. ``list(per_row_tensor)``.
    """
    if _shared_by_every_row(positions):
        return [torch.as_tensor(positions, dtype=torch.long).reshape(-1)] * batch
    if not isinstance(positions, Sequence) or len(positions) != batch:
        n = len(positions) if isinstance(positions, Sequence) else type(positions).__name__
        raise ValueError(f"give one position tensor for every row or a list with one per batch row ({batch}), got {n}.")
    return [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in positions]


def _shared_by_every_row(positions: Any) -> bool:
    """A tensor or a list of ints (the same positions in every row), not a list with one entry per row."""
    return torch.is_tensor(positions) or isinstance(positions, np.ndarray) or (
        isinstance(positions, Sequence) and bool(positions) and isinstance(positions[0], (int, np.integer)))


def require_absolute(positions: Any, what: str) -> None:
    """Refuse negative positions where a tool needs absolute ones (counted from the start of the sequence,
    so that they stay the same positions while ``generate`` appends tokens), and a bare number."""
    if isinstance(positions, (int, np.integer)):
        raise ValueError(f"{what} must be a list or tensor of positions, got the number {positions}; pass "
                         f"[{positions}].")
    rows = [positions] if _shared_by_every_row(positions) else list(positions)
    flat = torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows] or [torch.zeros(0, dtype=torch.long)])
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError(f"{what} must be absolute sequence positions (>= 0), got {int(flat.min())}; for the last "
                         "prompt token use inputs.tokens.shape[1] - 1.")


def dilate(mask: Bool[torch.Tensor, "rows cols"] | np.ndarray, buffer: int) -> Bool[torch.Tensor, "rows cols"]:
    """Grow a patch mask by ``buffer`` cells in all 8 directions (a square structuring element)."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if buffer < 0:
        raise ValueError(f"buffer must be >= 0, got {buffer}.")
    if buffer == 0:
        return mask.clone()
    grown = F.max_pool2d(mask[None, None].float(), kernel_size=2 * buffer + 1, stride=1, padding=buffer)
    return grown[0, 0].bool()


def object_positions(layout: ImageLayout, image: int, patch_mask: torch.Tensor | np.ndarray, buffer: int = 0
                     ) -> Int[torch.Tensor, "n"]:
    """Positions of an object's patches (``patch_mask`` on the image's grid), grown by ``buffer`` cells."""
    return layout.mask_to_positions(image, dilate(torch.as_tensor(patch_mask), buffer))


def random_image_positions(layout: ImageLayout, image: int, n: int, *, seed: int = 0,
                           exclude: torch.Tensor | np.ndarray | None = None) -> Int[torch.Tensor, "n"]:
    """``n`` distinct grid positions of the image drawn with a fixed seed, avoiding ``exclude`` (a mask)."""
    grid = layout.grid(image)
    allowed = torch.ones_like(grid, dtype=torch.bool)
    if exclude is not None:
        allowed &= ~torch.as_tensor(exclude, dtype=torch.bool)
    candidates = grid[allowed]
    if n > len(candidates):
        raise ValueError(f"asked for {n} random positions but only {len(candidates)} cells are allowed.")
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return candidates[order[:n]].sort().values


def background_positions(layout: ImageLayout, image: int, n: int, occupied: torch.Tensor | np.ndarray, *,
                         margin: int = 1, seed: int = 0) -> Int[torch.Tensor, "n"]:
    """``n`` random cells away from every object: outside ``occupied`` grown by ``margin`` cells, or, when
    that leaves fewer than ``n`` cells, merely outside ``occupied``."""
    occupied = torch.as_tensor(occupied, dtype=torch.bool)
    grown = dilate(occupied, margin)
    exclude = grown if int((~grown).sum()) >= n else occupied
    return random_image_positions(layout, image, n, seed=seed, exclude=exclude)


def high_norm_positions(layout: ImageLayout, image: int, activations: torch.Tensor, *, n_std: float = 2.0
                        ) -> Int[torch.Tensor, "n"]:
    """"Register" tokens: grid positions whose activation norm exceeds mean + ``n_std`` std of the image's.

    ``activations`` is [batch, pos, d] (e.g. ``cache["blocks.10.hook_resid_post"]`` or ``hook_embed``).
    """
    grid = layout.grid(image).flatten()
    norms = activations[layout.batch_of(image), grid].float().norm(dim=-1)
    threshold = norms.mean() + n_std * norms.std()
    return grid[norms > threshold].sort().values


def vision_positions(grid_size: int, patch_mask: torch.Tensor | np.ndarray, has_class_token: bool = True
                     ) -> Int[torch.Tensor, "n"]:
    """Token indices inside the vision tower (CLS first when present) of the patches in ``patch_mask``."""
    flat = torch.as_tensor(patch_mask, dtype=torch.bool).reshape(-1).nonzero().flatten()
    if torch.as_tensor(patch_mask).shape != (grid_size, grid_size):
        raise ValueError(f"patch mask must be {grid_size}x{grid_size}.")
    return flat + int(has_class_token)
