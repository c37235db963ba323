"""Any-resolution tiling, shared by LLaVA-NeXT and LLaVA-OneVision: the geometry of tiles and tokens.

Each image arrives as a base tile (the whole image resized to one tile) plus the crops of the best
``image_grid_pinpoints`` resolution. Every tile runs through the vision tower and the projector
(``hook_image_features`` and ``projector.*`` see [n_tiles, n_patches, d]). Then, per image, the crops'
features are stitched into one grid, rows or columns that only cover the processor's padding are cut
(unpadding), LLaVA-OneVision bilinearly shrinks grids larger than ``anyres_max_N`` tiles, and the
``image_newline`` embedding ends every row. ``hook_image_embeds`` is [total_image_tokens, d_model] in
sequence order: per image the base grid, then the crop grid row by row, each row followed by a newline.

The geometry mirrors transformers' ``pack_image_features`` and its processors' resize/pad steps. One
``TilePlan`` per image drives both the encoder and the layout, so the two cannot disagree. The pipeline
that uses it is ``architectures/llava_next/pipeline.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import select_best_resolution

from vlm_lens.config import VisionConfig


@dataclass(frozen=True)
class TilePlan:
    """How one image is tiled and packed. Grid windows and shapes are in patch (token) units."""

    size: tuple[int, int]  # original (height, width), as the processor reports it in image_sizes
    tile: int  # tile side in pixels (the tower's image_size)
    patch: int  # patch side in pixels (tile % patch pixels at a tile's edge are never seen)
    side: int  # patches per tile side
    canvas: tuple[int, int] | None = None  # chosen pinpoint (height, width) in pixels; None: base tile only
    rows: tuple[int, int] = (0, 0)  # unpadded window [start, stop) of the full crop grid
    cols: tuple[int, int] = (0, 0)
    shape: tuple[int, int] = (0, 0)  # final crop grid (rows, cols), after any downsampling

    @property
    def crop_tiles(self) -> tuple[int, int]:
        return (0, 0) if self.canvas is None else (self.canvas[0] // self.tile, self.canvas[1] // self.tile)

    @property
    def n_tiles(self) -> int:
        return 1 + self.crop_tiles[0] * self.crop_tiles[1]

    @property
    def n_tokens(self) -> int:
        if self.canvas is None:
            return self.side**2 + 1  # the base tile and one newline
        return self.side**2 + self.shape[0] * (self.shape[1] + 1)


def plan_image(vision: VisionConfig, pinpoints: tuple[tuple[int, int], ...], max_crop_tiles: int | None,
               size: tuple[int, int], tiled: bool = True) -> TilePlan:
    """The plan of one image of original ``size`` (height, width) for a tower of ``vision``'s tile size,
    with the model's ``image_grid_pinpoints`` and (LLaVA-OneVision) ``anyres_max_N``'s N."""
    height, width = size
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {size} is not a positive (height, width); check image_sizes.")
    tile, patch, side = vision.image_size, vision.patch_size, vision.grid_size
    if not tiled:
        return TilePlan(size, tile, patch, side)
    canvas = tuple(select_best_resolution((height, width), [list(p) for p in pinpoints]))
    full = (canvas[0] // tile * side, canvas[1] // tile * side)
    rows, cols = _unpad_window(size, full)
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    if max_crop_tiles is not None:  # LLaVA-OneVision's anyres_max_N
        ratio = math.sqrt(shape[0] * shape[1] / (max_crop_tiles * side**2))
        if ratio > 1.1:
            shape = (int(shape[0] // ratio), int(shape[1] // ratio))
    return TilePlan(size, tile, patch, side, canvas, rows, cols, shape)


def _unpad_window(size: tuple[int, int], full: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns of the crop grid that cover the image, not the padding (HF ``unpad_image``)."""
    (height, width), (n_rows, n_cols) = size, full
    if width / height > n_cols / n_rows:
        pad = (n_rows - int(round(height * (n_cols / width), 7))) // 2
        return (pad, n_rows - pad), (0, n_cols)
    pad = (n_cols - int(round(width * (n_rows / height), 7))) // 2
    return (0, n_rows), (pad, n_cols - pad)


def pack(plan: TilePlan, embeds: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """One image's projected tiles [n_tiles, side*side, d] -> its tokens [n_tokens, d] in sequence order."""
    base = embeds[0]
    if plan.canvas is None:
        return torch.cat([base, newline[None].to(base)])
    d, side, (n_h, n_w) = embeds.shape[-1], plan.side, plan.crop_tiles
    grid = embeds[1:].view(n_h, n_w, side, side, d).permute(4, 0, 2, 1, 3).reshape(d, n_h * side, n_w * side)
    grid = grid[:, plan.rows[0]:plan.rows[1], plan.cols[0]:plan.cols[1]]
    if tuple(grid.shape[1:]) != plan.shape:
        grid = F.interpolate(grid[None], size=list(plan.shape), mode="bilinear")[0]
    grid = torch.cat([grid, newline[:, None, None].expand(d, grid.shape[1], 1).to(grid)], dim=-1)
    return torch.cat([base, grid.flatten(1).T])


# ----------------------------------------------------------------------------------- regions
def token_boxes(plan: TilePlan) -> torch.Tensor:
    """[n_tokens, 4] (top, left, bottom, right) in original-image pixels per token; NaN for newlines.

    The base tile is the whole image resized to one tile (LLaVA-OneVision's untiled images are first
    padded to a square); crops cut the image resized into the pinpoint and centred with padding.
    """
    (height, width), side = plan.size, plan.side
    nan = torch.full((1, 4), float("nan"), dtype=torch.float64)
    if plan.canvas is None:
        square = max(height, width)
        base = _outer(_axis(plan, side, square / plan.tile, (square - height) // 2, height),
                      _axis(plan, side, square / plan.tile, (square - width) // 2, width))
        return torch.cat([base, nan])
    base = _outer(_axis(plan, side, height / plan.tile, 0, height), _axis(plan, side, width / plan.tile, 0, width))
    (canvas_h, canvas_w), (n_h, n_w) = plan.canvas, plan.crop_tiles
    new_h, new_w = _resized(plan.size, plan.canvas)
    ys = _axis(plan, n_h * side, height / new_h, (canvas_h - new_h) // 2 * height / new_h, height)
    xs = _axis(plan, n_w * side, width / new_w, (canvas_w - new_w) // 2 * width / new_w, width)
    ys, xs = _shrink(ys[plan.rows[0]:plan.rows[1]], plan.shape[0]), _shrink(xs[plan.cols[0]:plan.cols[1]], plan.shape[1])
    crops = torch.cat([_outer(ys, xs).view(*plan.shape, 4), nan.expand(plan.shape[0], 1, 4)], dim=1)
    return torch.cat([base, crops.reshape(-1, 4)])


def _resized(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Size of the image once resized into the pinpoint, keeping its aspect (HF ``get_patch_output_size``)."""
    (height, width), (target_h, target_w) = size, canvas
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def _axis(plan: TilePlan, n: int, scale: float, offset: float | int, extent: int) -> torch.Tensor:
    """[n, 2] spans (lo, hi) along one axis of ``n`` tokens laid out tile after tile, mapped from tile
    pixels to the image by ``pixel * scale - offset`` and clipped to [0, extent]; NaN: padding only."""
    index = torch.arange(n)
    start = (index // plan.side * plan.tile + index % plan.side * plan.patch).double()
    spans = (torch.stack([start, start + plan.patch], dim=1) * scale - offset).clamp(0, extent)
    return spans.masked_fill((spans[:, 1] <= spans[:, 0])[:, None], float("nan"))


def _shrink(spans: torch.Tensor, n_out: int) -> torch.Tensor:
    """Spans after bilinear downsampling to ``n_out``: each output covers every input it reads."""
    if n_out == len(spans):
        return spans
    eye = torch.eye(len(spans))[None, :, :, None]  # PyTorch's own weights, one input at a time
    reads = F.interpolate(eye, size=[n_out, 1], mode="bilinear")[0, :, :, 0].T > 0  # [n_out, n_in]
    lo = torch.where(reads, spans[:, 0].nan_to_num(math.inf), math.inf).amin(1)
    hi = torch.where(reads, spans[:, 1].nan_to_num(-math.inf), -math.inf).amax(1)
    out = torch.stack([lo, hi], dim=1)
    return out.masked_fill((hi <= lo)[:, None], float("nan"))


def _outer(ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Boxes of a row-major grid from its row spans and column spans."""
    rows, cols = torch.meshgrid(torch.arange(len(ys)), torch.arange(len(xs)), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    return torch.stack([ys[rows, 0], xs[cols, 0], ys[rows, 1], xs[cols, 1]], dim=1)
