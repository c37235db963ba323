"""Where Idefics3's tiles sit in the sequence: one ``TileSpan`` per tile.

The processor splits an image into ``rows`` x ``cols`` crops (when it is larger than one tile) plus a
global image (the whole image shrunk to one tile), and writes it as::

    <fake><row_1_col_1><image>*n <fake><row_1_col_2><image>*n ... \\n  (one line per crop row)
    \\n<fake><global-img><image>*n<fake>

(an image small enough for one tile, or any image with ``do_image_splitting=False``, is only the last line).
Text tokens sit between the tiles, so each tile is its own span of consecutive image tokens (which
``hook_image_embeds`` rows and the analysis tools rely on): layout index ``i`` is the i-th tile in sequence
order, ``layout.grid(i)`` its ``tile_side`` x ``tile_side`` token grid. A ``TileSpan`` also says

- ``image``: which image of the batch (in sequence order) the tile belongs to, ``tile``: its (row, col)
  among the image's crops or None for the global image, ``tiles``: the image's (rows, cols) of crops;
- ``markers``: the text tokens that structure it: the ``<fake_token_around_image>`` and the row/column or
  ``<global-img>`` tag before each tile, the newlines after each crop row, the closing ``<fake...>``;
- on the global tile of a split image, ``crop_grid``: the crops' tokens put together as the image's
  high-resolution grid [rows * tile_side, cols * tile_side] (``layout.crop_grid(i)``; ``to_str_tokens``
  labels the crops' tokens by their cell there, ``<img{i} crop r c>``, under the global tile's index ``i``);
- ``boxes``: the region of the original image behind each token, when the original sizes are known.

The layout reads positions, not token ids: hand-made tokens must follow the processor's format. Without
``tile_grid`` (the processor shim adds it; stock processors do not) every tile is laid out as an image of
its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Int

from vlm_lens.layout import ImageLayout, ImageSpan, split_image_tokens


@dataclass(frozen=True)
class TileSpan(ImageSpan):
    """One tile's tokens: an ``ImageSpan`` plus which image and which crop it is."""

    image: int = 0  # the image of the batch (sequence order) this tile belongs to
    tile: tuple[int, int] | None = None  # (row, col) among the image's crops; None: the global image
    tiles: tuple[int, int] = (0, 0)  # the image's crop rows and cols; (0, 0): not split


def image_tiles(layout: ImageLayout, image: int) -> list[int]:
    """Layout indices of image ``image``'s tiles: its crops row by row, then its global image."""
    found = [i for i, s in enumerate(layout.spans) if getattr(s, "image", None) == image]
    if not found:
        n = len({getattr(s, "image", None) for s in layout.spans})
        raise ValueError(f"image {image} is not in this layout, which holds {n} image(s) (numbered from 0).")
    return found


def tiles_per_image(tile_grid: Int[torch.Tensor, "n_images 2"]) -> list[int]:
    """Crops plus the global image, per image ((0, 0): the global image only)."""
    pairs = tile_grid.tolist()
    bad = [p for p in pairs if min(p) < 0 or (0 in p and p != [0, 0])]
    if bad:
        raise ValueError(f"tile_grid rows {bad} are not (rows, cols) of crops, both positive or both 0 (not split); "
                         "pass tile_grid from the same processor call as the tokens.")
    return [r * c + 1 for r, c in pairs]


def _boxes(size: tuple[int, int], side: int, rows: int, cols: int, tile: tuple[int, int] | None) -> torch.Tensor:
    """[side**2, 4] (top, left, bottom, right) in original pixels: the processor stretches the whole image onto
    the crops' canvas (and onto the global tile), without cropping or padding."""
    height, width = size
    if tile is None:
        rows = cols = 1
        tile = (0, 0)
    r, c = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                          indexing="ij")
    r, c = (r.flatten() + tile[0] * side), (c.flatten() + tile[1] * side)
    dy, dx = height / (rows * side), width / (cols * side)
    return torch.stack([r * dy, c * dx, (r + 1) * dy, (c + 1) * dx], dim=1)


def tile_layout(image_mask: Bool[torch.Tensor, "batch pos"], side: int,
                tile_grid: Int[torch.Tensor, "n_images 2"] | None = None,
                image_sizes: Int[torch.Tensor, "n_images 2"] | None = None) -> ImageLayout:
    """Split the image tokens into tiles of ``side**2`` and group them into images by ``tile_grid``."""
    per_tile, total = side * side, int(image_mask.sum())
    if tile_grid is None:
        if total % per_tile:
            raise ValueError(f"the tokens hold {total} image tokens, not a multiple of the {per_tile} a tile takes; "
                             "expand prompts with model.prepare.")
        tile_grid = torch.zeros(total // per_tile, 2, dtype=torch.long)
    if image_sizes is not None and len(image_sizes) != len(tile_grid):
        raise ValueError(f"image_sizes has {len(image_sizes)} rows but tile_grid {len(tile_grid)}; pass both from "
                         "the same processor call.")
    counts = tiles_per_image(tile_grid)
    chunks = list(split_image_tokens(image_mask, [per_tile] * sum(counts), "tile_grid",
                                     lambda k: f"a tile of {per_tile} tokens"))
    spans, first = [], 0
    for image, ((rows, cols), n) in enumerate(zip(tile_grid.tolist(), counts)):
        group, first = chunks[first:first + n], first + n
        if len({b for b, _, _ in group}) != 1:
            raise ValueError(f"image {image}'s {n} tiles fall in different batch rows; tile_grid does not match the "
                             "tokens (pass both from the same processor call).")
        size = None if image_sizes is None else tuple(int(v) for v in image_sizes[image].tolist())
        spans += _image_spans(image_mask[group[0][0]], group, image, (rows, cols), side, size)
    return ImageLayout(tuple(spans))


def _image_spans(row_mask: torch.Tensor, group: list, image: int, tiles: tuple[int, int], side: int,
                 size: tuple[int, int] | None) -> list[TileSpan]:
    rows, cols = tiles
    starts = [int(chunk[0]) for _, _, chunk in group]

    def text(positions) -> list[int]:
        return [p for p in positions if 0 <= p < len(row_mask) and not bool(row_mask[p])]

    spans = []
    for q, (b, _, chunk) in enumerate(group):
        start, end = starts[q], int(chunk[-1]) + 1
        is_global = q == len(group) - 1
        tile = None if is_global else divmod(q, cols)
        markers = [start - 2, start - 1]
        if is_global:
            markers.append(end)
        elif tile[1] == cols - 1:  # the newline(s) closing a row of crops
            markers += range(end, starts[q + 1] - 2)
        crop_grid = None
        if is_global and rows:
            crop_grid = einops.rearrange(torch.stack([c.reshape(side, side) for _, _, c in group[:-1]]),
                                         "(R C) r c -> (R r) (C c)", R=rows, C=cols).contiguous()
        spans.append(TileSpan(batch=b, start=start, end=end, grid=chunk.reshape(side, side),
                              markers=torch.tensor(text(markers), dtype=torch.long), crop_grid=crop_grid,
                              boxes=None if size is None else _boxes(size, side, rows, cols, tile),
                              image=image, tile=tile, tiles=tiles))
    return spans
