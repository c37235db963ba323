"""Where each image sits in the sequence: spans, patch grids and conversions between them.

Every image has a base ``grid`` (one tile's patch grid). Any-resolution (tiled) images also have a
``crop_grid`` (the packed high-resolution grid after unpadding, and
downsampling where the model does it), ``newlines`` (the learned row-end tokens, listed apart from both
grids) and ``boxes``: the region of the original image each token was computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int


def _no_positions() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ImageSpan:
    """One image's tokens in one batch row."""

    batch: int
    start: int  # first sequence position of the image's tokens
    end: int  # one past the last
    grid: torch.Tensor  # [rows, cols] sequence positions, row-major over the (base tile's) patch grid
    extra: torch.Tensor = field(default_factory=_no_positions)  # positions on no grid: CLS, newlines
    crop_grid: torch.Tensor | None = None  # [rows, cols] positions of the packed crop grid (any-resolution)
    newlines: torch.Tensor = field(default_factory=_no_positions)  # newline tokens (also in extra)
    boxes: torch.Tensor | None = None  # [end - start, 4] float (top, left, bottom, right), original pixels
    markers: torch.Tensor = field(default_factory=_no_positions)  # tokens opening/closing the image, outside it
    # text tokens inside [start, end) that receive no image embedding (e.g. row-break tokens between rows), sorted
    text: torch.Tensor = field(default_factory=_no_positions)

    @property
    def n_embeds(self) -> int:
        """Rows of the flattened ``hook_image_embeds`` that belong to this image: its positions but ``text``."""
        return self.end - self.start - len(self.text)

    def embed_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Index of each position (inside the span, not ``text``) among this image's rows of ``hook_image_embeds``."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        return positions - self.start - torch.searchsorted(self.text.to(positions.device), positions)


@dataclass(frozen=True)
class ImageLayout:
    """The image layout of a batch: ``spans[i]`` is image ``i`` (images numbered in sequence order).

    ``axis`` says what the spans' positions index: ``"sequence"`` (image tokens in the residual stream), or
    ``"keys"`` (the cross-attention keys a model reads its images from; the sequence then holds
    one placeholder token per image).
    """

    spans: tuple[ImageSpan, ...]
    axis: Literal["sequence", "keys"] = "sequence"

    @property
    def n_images(self) -> int:
        return len(self.spans)

    def _span(self, image: int) -> ImageSpan:
        if not 0 <= image < self.n_images:
            raise ValueError(f"image index {image} out of range: this batch has {self.n_images} image(s).")
        return self.spans[image]

    def grid(self, image: int) -> Int[torch.Tensor, "rows cols"]:
        """Sequence positions of image ``image`` laid out as its patch grid."""
        return self._span(image).grid

    def crop_grid(self, image: int) -> Int[torch.Tensor, "rows cols"]:
        """Sequence positions of the image's high-resolution crop grid (row-major, newlines excluded)."""
        span = self._span(image)
        if span.crop_grid is None:
            raise ValueError(
                f"image {image} has no crop grid: it was encoded as one tile (a single-tile model, or a "
                f"multi-image prompt that the model encodes one tile per image). Use layout.grid({image})."
            )
        return span.crop_grid

    def grids(self, image: int) -> dict[str, Int[torch.Tensor, "rows cols"]]:
        """Each grid of the image by name: ``"base"`` (``grid``) and, for tiled images, ``"crops"``."""
        span = self._span(image)
        return {"base": span.grid} if span.crop_grid is None else {"base": span.grid, "crops": span.crop_grid}

    def newlines(self, image: int) -> Int[torch.Tensor, "n"]:
        """Positions of the image's newline tokens (one after each crop-grid row); on no grid."""
        return self._span(image).newlines

    def markers(self, image: int) -> Int[torch.Tensor, " n"]:
        """Positions of the text tokens that open and close the image (e.g. ``<|vision_start|>`` and
        ``<|vision_end|>``), outside [start, end) and on no grid; empty where the model has none."""
        return self._span(image).markers

    def boxes(self, image: int) -> Float[torch.Tensor, "n_tokens 4"]:
        """Region of the original image behind each of the image's tokens: row k is position ``start + k``.

        Boxes are (top, left, bottom, right) in original-image pixels (fractional where the processor
        resized): the footprint of the pixels a token reads, before the resampling filter blurs its edge.
        A token downsampled from several gets the box bounding all of theirs. NaN rows
        (newlines) have none.
        """
        span = self._span(image)
        if span.boxes is None:
            raise ValueError(
                f"image {image} has no region map: it was laid out without the original image size "
                "(single-tile layouts only know the processed tile; use grid() there)."
            )
        return span.boxes

    def positions_in_box(self, image: int, box: Sequence[float | int]) -> Int[torch.Tensor, "n"]:
        """Positions of the image's tokens whose region overlaps ``box`` (top, left, bottom, right), in
        original-image pixels: base-grid and crop-grid tokens alike, never newlines."""
        if len(box) != 4:
            raise ValueError(f"box {tuple(box)} must be (top, left, bottom, right) in original-image pixels.")
        top, left, bottom, right = (float(v) for v in box)
        if not (bottom > top and right > left):
            raise ValueError(f"box {tuple(box)} is empty; give (top, left, bottom, right) with bottom > top, right > left.")
        b = self.boxes(image)
        hit = (b[:, 0] < bottom) & (b[:, 2] > top) & (b[:, 1] < right) & (b[:, 3] > left)
        return hit.nonzero().flatten() + self._span(image).start

    def require_sequence_axis(self, tool: str) -> None:
        """Refuse a ``"keys"`` layout where ``tool`` reads image positions of the sequence."""
        if self.axis == "keys":
            raise ValueError(f"{tool}: this model reads its images through cross-attention, so its image grids index "
                             "cross-attention keys, not sequence positions. Read the blocks.{l}.cross_attn hooks "
                             "(the family's analysis module under vlm_lens.architectures) instead.")

    def batch_of(self, image: int) -> int:
        return self._span(image).batch

    def images_in_row(self, batch: int) -> list[int]:
        return [i for i, s in enumerate(self.spans) if s.batch == batch]

    def position(self, image: int, row: int, col: int) -> int:
        """The sequence position of image ``image``'s patch at grid cell (row, col)."""
        grid = self.grid(image)
        if not (0 <= row < grid.shape[0] and 0 <= col < grid.shape[1]):
            raise ValueError(f"cell ({row}, {col}) is outside image {image}'s {tuple(grid.shape)} grid.")
        return int(grid[row, col])

    def image_positions(self, batch: int | None = None) -> Int[torch.Tensor, "n"]:
        """All image-token positions (grid and extra, not ``text``) of one batch row, or of row 0 when batch is None."""
        batch = 0 if batch is None else batch
        parts = [_embedded(s) for s in self.spans if s.batch == batch]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def mask_to_positions(self, image: int, patch_mask: Bool[torch.Tensor, "rows cols"]) -> Int[torch.Tensor, "n"]:
        """Sequence positions of the patches where ``patch_mask`` is True (row-major order)."""
        grid = self.grid(image)
        patch_mask = torch.as_tensor(patch_mask, dtype=torch.bool)
        if patch_mask.shape != grid.shape:
            raise ValueError(
                f"patch mask has shape {tuple(patch_mask.shape)} but image {image}'s grid is {tuple(grid.shape)}."
            )
        return grid[patch_mask]

    def positions_to_mask(self, image: int, positions: torch.Tensor | list[int]) -> Bool[torch.Tensor, "rows cols"]:
        """Boolean patch mask of image ``image`` that is True at the given sequence positions."""
        grid = self.grid(image)
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        return torch.isin(grid, positions)

    def cell_of(self, position: int, batch: int = 0) -> tuple[int, int, int] | None:
        """(image, row, col) of a sequence position of batch row ``batch``, or None if no grid cell is there."""
        for i, span in enumerate(self.spans):
            if span.batch != batch:
                continue
            hits = (span.grid == position).nonzero()
            if len(hits):
                return i, int(hits[0, 0]), int(hits[0, 1])
        return None


def _embedded(span: ImageSpan) -> torch.Tensor:
    """The span's positions that receive image embeddings (all but its ``text`` tokens)."""
    positions = torch.arange(span.start, span.end)
    return positions[~torch.isin(positions, span.text)] if len(span.text) else positions


def build_layout(image_mask: torch.Tensor, tokens_per_image: int, grid_shape: tuple[int, int],
                 n_leading_extra: int = 0) -> ImageLayout:
    """Split each row's image tokens into images of ``tokens_per_image`` consecutive positions.

    ``n_leading_extra`` tokens at the start of each image (a tower's CLS kept by strategy "full") are
    listed apart from the grid.
    """
    rows, cols = grid_shape
    if tokens_per_image != n_leading_extra + rows * cols:
        raise ValueError(f"{tokens_per_image} tokens per image do not fit a {rows}x{cols} grid.")
    counts = image_mask.sum(dim=1).tolist()
    for b, n in enumerate(counts):
        if n % tokens_per_image:
            raise ValueError(
                f"batch row {b} has {n} image tokens, not a multiple of the {tokens_per_image} tokens one image takes."
            )
    sizes = [tokens_per_image] * (int(sum(counts)) // tokens_per_image)
    spans = [ImageSpan(batch=b, start=int(chunk[0]), end=int(chunk[-1]) + 1,
                       grid=chunk[n_leading_extra:].reshape(rows, cols), extra=chunk[:n_leading_extra])
             for b, _, chunk in split_image_tokens(image_mask, sizes, "the image tokens",
                                                   lambda k: f"{tokens_per_image} tokens")]
    return ImageLayout(tuple(spans))


def split_image_tokens(image_mask: torch.Tensor, sizes: Sequence[int], source: str,
                       describe: Callable[[int], str]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Walk each row's image tokens and hand out images of ``sizes[k]`` consecutive positions, in batch order.

    Yields ``(batch row, image index, positions)``. ``source`` names the input that gave the sizes (for
    the error messages) and ``describe(k)`` describes image k (its size or grid). Raises when a row has
    more image tokens than the images take, when an image's tokens are not consecutive, or when
    images are left over.
    """
    k = 0
    for b in range(image_mask.shape[0]):
        positions = image_mask[b].nonzero().flatten().cpu()
        used = 0
        while used < len(positions):
            if k == len(sizes):
                raise ValueError(f"batch row {b} has more image tokens than the {len(sizes)} image(s) of {source} "
                                 f"take; give one {source} row per image.")
            n = sizes[k]
            chunk = positions[used:used + n]
            if len(chunk) < n or int(chunk[-1] - chunk[0]) + 1 != n:
                raise ValueError(f"batch row {b}: image {k} ({describe(k)}) takes {n} consecutive image tokens, "
                                 "which the tokens do not hold; expand prompts with model.prepare.")
            yield b, k, chunk
            used, k = used + n, k + 1
    if k != len(sizes):
        raise ValueError(f"{source} describes {len(sizes)} images but the tokens hold {k}.")
