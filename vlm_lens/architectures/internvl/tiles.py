"""Where InternVL's tiles sit in the sequence: one ``TileSpan`` per tile (Idefics3's, reused).

The processor cuts an image into ``rows`` x ``cols`` crops plus a thumbnail (the whole image shrunk to one tile),
or keeps it as one tile (a 1x1 canvas, or ``crop_to_patches=False``), and writes it as::

    <img> <IMG_CONTEXT> * (tokens_per_tile * n_tiles) </img>

crops row by row, then the thumbnail, with no text in between. Layout index ``i`` is the i-th tile in sequence
order and ``layout.grid(i)`` its ``tile_side`` x ``tile_side`` token grid; as in Idefics3 a ``TileSpan`` says which
image the tile belongs to (``image``), which crop it is (``tile``: (row, col), None for the thumbnail or a single
tile) and the image's ``tiles`` (rows, cols; (0, 0) for a single tile); the thumbnail's span holds the crops put
together as ``crop_grid`` and every span the ``boxes`` of the original image behind its tokens (the processor
stretches the image onto the crops' canvas and onto the thumbnail, as Idefics3's does). ``markers`` are the
``<img>`` before an image's first tile and the ``</img>`` after its last. The layout reads positions, not token
ids: hand-made tokens must follow the processor's format.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from jaxtyping import Bool, Int

from vlm_lens.architectures.idefics3.tiles import TileSpan, image_tiles, tile_layout
from vlm_lens.layout import ImageLayout

__all__ = ["TileSpan", "image_tiles", "internvl_tile_layout"]


def internvl_tile_layout(image_mask: Bool[torch.Tensor, "batch pos"], side: int,
                         tile_grid: Int[torch.Tensor, "n_images 2"] | None = None,
                         image_sizes: Int[torch.Tensor, "n_images 2"] | None = None) -> ImageLayout:
    """Idefics3's tile layout (the same grouping, crop grids and boxes) with InternVL's markers."""
    spans = tile_layout(image_mask, side, tile_grid, image_sizes).spans
    out = []
    for i, span in enumerate(spans):
        first = i == 0 or spans[i - 1].image != span.image
        last = i == len(spans) - 1 or spans[i + 1].image != span.image
        row = image_mask[span.batch]
        markers = [p for p, keep in ((span.start - 1, first), (span.end, last))
                   if keep and 0 <= p < len(row) and not bool(row[p])]
        out.append(replace(span, markers=torch.tensor(markers, dtype=torch.long)))
    return ImageLayout(tuple(out))
