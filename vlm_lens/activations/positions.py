"""Which rows of a batch are kept, and what each kept row is (item, position, image cell).

``positions`` is ``"image"`` (every image token), ``"text"`` (every real non-image token), ``"last"``
(the last real token), ``"all"`` (every real token) or a function ``(inputs, item) -> positions`` called
once per item with a one-row view of the batch (tokens, attention mask, image mask and layout of that
item alone, no pixels) and the dataset item; it returns sequence positions (ints, a LongTensor or a
bool mask over the item's tokens). Positions count from the item's first token, padding excluded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch
from jaxtyping import Int

from vlm_lens.inputs import VLMInputs
from vlm_lens.layout import ImageLayout

NAMED = ("image", "text", "last", "all")
ROW_FIELDS = ("item", "position", "image", "grid", "grid_row", "grid_col")
BASE_GRID, CROP_GRID, NO_GRID = 0, 1, -1
PositionsFn = Callable[[VLMInputs, Any], Any]


def describe(positions: str | PositionsFn) -> str:
    """The positions argument as it enters the fingerprint: the name, or the function's qualified name
    (without its module, which differs when the same script runs as ``__main__``)."""
    if isinstance(positions, str):
        if positions not in NAMED:
            raise ValueError(f"positions={positions!r} is not one of {NAMED}; or pass a function (inputs, item) -> positions.")
        return positions
    if not callable(positions):
        raise ValueError(f"positions must be one of {NAMED} or a function (inputs, item) -> positions, "
                         f"got {type(positions).__name__}.")
    return getattr(positions, "__qualname__", None) or type(positions).__qualname__


@dataclass(frozen=True)
class Selection:
    """Kept rows of one batch, in dataset order: batch row and sequence position of each, and its row info."""

    batch: Int[torch.Tensor, " n"]
    seq: Int[torch.Tensor, " n"]  # position in the padded batch
    info: Int[torch.Tensor, "n 6"]  # ROW_FIELDS per row
    indices: list[int]  # dataset index of each item of the batch
    counts: list[int]  # rows kept per item

    @property
    def n(self) -> int:
        return len(self.batch)


@lru_cache(maxsize=64)
def _grid_cells(kind: int, rows: int, cols: int) -> torch.Tensor:
    """[rows * cols, 3]: (grid kind, row, col) of each cell, row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.full((rows * cols,), kind), r.reshape(-1), c.reshape(-1)], dim=1)


def _cells(layout: ImageLayout, image_mask: torch.Tensor) -> torch.Tensor:
    """[batch, pos, 4]: (image within its item, grid kind, row, col) per position; -1 where none applies.

    A cross-attention layout's grids index image keys, not positions: there each image's placeholder token
    gets the image's index and no cell."""
    cells = torch.full((*image_mask.shape, 4), -1, dtype=torch.long)
    if layout.axis == "keys":
        for b in range(image_mask.shape[0]):
            placeholders = image_mask[b].nonzero().flatten()
            cells[b, placeholders, 0] = torch.arange(len(placeholders))
        return cells
    local = [0] * image_mask.shape[0]  # images seen so far in each batch row
    for span in layout.spans:
        cells[span.batch, span.start:span.end, 0] = local[span.batch]
        local[span.batch] += 1
        for kind, grid in ((BASE_GRID, span.grid), (CROP_GRID, span.crop_grid)):
            if grid is not None:
                cells[span.batch, grid.reshape(-1), 1:] = _grid_cells(kind, *grid.shape)
    return cells


def row_view(inputs: VLMInputs, batch: int) -> VLMInputs:
    """Batch row ``batch`` alone, padding removed (right padding: positions do not move); no pixels."""
    length = int(inputs.attention_mask[batch].sum())
    spans = tuple(replace(inputs.layout.spans[i], batch=0) for i in inputs.layout.images_in_row(batch))
    return VLMInputs(tokens=inputs.tokens[batch:batch + 1, :length], attention_mask=inputs.attention_mask[batch:batch + 1, :length],
                     image_mask=inputs.image_mask[batch:batch + 1, :length], layout=ImageLayout(spans))


def _named(positions: str, image_mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[batch, pos] mask of the kept positions."""
    if positions == "image":
        return image_mask & real
    if positions == "text":
        return ~image_mask & real
    if positions == "last":
        last = torch.zeros_like(real)
        last[torch.arange(len(real)), real.sum(1) - 1] = True
        return last
    return real


def _from_fn(fn: PositionsFn, inputs: VLMInputs, batch: int, item: Any, index: int, length: int) -> torch.Tensor:
    got = fn(row_view(inputs, batch), item)
    pos = torch.as_tensor(got).cpu()
    if pos.numel() == 0:  # [] is a float tensor to torch: nothing kept for this item
        return torch.zeros(0, dtype=torch.long)
    if pos.dtype == torch.bool:
        if pos.shape != (length,):
            raise ValueError(f"positions function gave a bool mask of shape {tuple(pos.shape)} for item {index}, "
                             f"whose sequence has {length} tokens; give a mask of that length or a list of positions.")
        return pos.nonzero().flatten()
    if pos.is_floating_point() or pos.ndim > 1:
        raise ValueError(f"positions function gave {tuple(pos.shape)} {pos.dtype} for item {index}; return a 1-D "
                         "list/LongTensor of sequence positions or a bool mask over the item's tokens.")
    pos = pos.long().reshape(-1)
    bad = pos[(pos < 0) | (pos >= length)]
    if len(bad):
        raise ValueError(f"positions function gave position(s) {bad[:5].tolist()} for item {index}, whose sequence "
                         f"has {length} tokens (0..{length - 1}).")
    return pos


def select(positions: str | PositionsFn, inputs: VLMInputs, items: Sequence[Any], indices: Sequence[int]) -> Selection:
    """The kept rows of a right-padded batch: ``items[b]`` (dataset index ``indices[b]``) is batch row b."""
    image_mask, real = inputs.image_mask.cpu(), inputs.attention_mask.cpu().bool()
    if isinstance(positions, str):  # one mask for the batch: rows come out item by item, positions ascending
        batch, seq = _named(positions, image_mask, real).nonzero(as_tuple=True)
    else:
        lengths = real.sum(1).tolist()
        picked = [_from_fn(positions, inputs, b, item, index, int(lengths[b]))
                  for b, (item, index) in enumerate(zip(items, indices))]
        batch = torch.cat([torch.full_like(pos, b) for b, pos in enumerate(picked)])
        seq = torch.cat(picked)
    cells = _cells(inputs.layout, image_mask)[batch, seq]
    item = torch.as_tensor(list(indices), dtype=torch.long)[batch]
    info = torch.cat([item[:, None], seq[:, None], cells], dim=1)
    counts = torch.bincount(batch, minlength=len(indices)).tolist()
    return Selection(batch, seq, info, [int(i) for i in indices], counts)
