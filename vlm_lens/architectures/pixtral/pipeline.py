"""The Pixtral image pipeline: images of any size, one merged-token grid each, rows closed by ``[IMG_BREAK]``.
``PixtralPipeline`` is shared by Mistral 3 (``Mistral3Pipeline``: 2x2 patch merger and its projector) and LLaVA
with a Pixtral tower (``vlm_lens.architectures.llava``: no merger, LLaVA's projector).

Every image arrives padded in ``pixel_values`` [n_images, 3, H, W] with its processed (height, width) in
``image_sizes`` (multiples of ``patch_size * spatial_merge_size``); it takes ``rows * cols`` image tokens,
written row by row as ``[IMG]`` * cols followed by ``[IMG_BREAK]``, the last break replaced by ``[IMG_END]``.

- ``encode``: Pixtral tower -> ``hook_image_features`` -> projector (Mistral 3: norm, patch merger, MLP) ->
  ``hook_image_embeds`` [total_image_tokens, d_model] in sequence order.
- ``layout``: per image (``PixtralLayout``) its ``grid`` [rows, cols] of ``[IMG]`` positions, the ``[IMG_BREAK]``
  positions between the rows as ``newlines`` (text tokens inside the image's span, listed in ``text``: no
  row of ``hook_image_embeds`` belongs to them), the ``[IMG_END]`` position as ``markers``, and ``boxes`` when
  the original sizes are known (``original_sizes``, added by ``PixtralImagesProcessor``). The layout reads
  positions, not token ids: hand-made tokens must follow the processor's format.
- positions: the language model's own 1-D rotary (text and image tokens alike), so ``start_at_layer`` works.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.architectures.pixtral.projector import Mistral3Projector
from vlm_lens.architectures.pixtral.vision import HookedPixtralVision
from vlm_lens.layout import ImageLayout, ImageSpan
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def image_sizes_of(extras: dict[str, Any]) -> torch.Tensor:
    """``image_sizes`` from ``extras`` as a [n_images, 2] LongTensor of processed (height, width), checked."""
    sizes = extras.get("image_sizes")
    if sizes is None:
        raise ValueError("This model needs image_sizes (each image's processed (height, width)): pass image_sizes=... "
                         "with tokens and pixel_values, or build inputs with model.prepare(prompt, images=[...]).")
    sizes = torch.as_tensor(sizes).long().cpu()
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes has shape {tuple(sizes.shape)}; expected [n_images, 2] rows of (height, width).")
    return sizes


def token_grids(sizes: torch.Tensor, token_size: int) -> list[tuple[int, int]]:
    """(rows, cols) of image tokens per image; a ValueError unless every size is a positive multiple of a token."""
    bad = [tuple(s) for s in sizes.tolist() if min(s) <= 0 or s[0] % token_size or s[1] % token_size]
    if bad:
        raise ValueError(f"image_sizes {bad} are not positive multiples of {token_size} px (patch_size * "
                         "spatial_merge_size): use the checkpoint's processor (model.prepare), which resizes to them.")
    return [(h // token_size, w // token_size) for h, w in sizes.tolist()]


def token_boxes(shape: tuple[int, int], processed: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """[rows * cols, 4] (top, left, bottom, right) in original pixels: the processor stretches the whole image to
    the processed size (no crop; the batch padding lies outside it)."""
    rows, cols = shape
    dy, dx = original[0] / rows, original[1] / cols
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    r, c = r.flatten(), c.flatten()
    return torch.stack([r * dy, c * dx, (r + 1) * dy, (c + 1) * dx], dim=1)


class PixtralPipeline(ImagePipeline):
    """The Pixtral tower's images for any ``PixtralVLMConfig``: checking pixels and sizes, the tower, the layout
    with ``[IMG_BREAK]``/``[IMG_END]``. A subclass's ``build`` adds the projector."""

    extra_keys: tuple[str, ...] = ("image_sizes",)

    def processed_size(self, extras: dict[str, Any], image: int) -> tuple[int, int] | None:
        height, width = image_sizes_of(extras)[image].tolist()
        return int(height), int(width)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        sizes, cfg = image_sizes_of(extras), model.vlm_cfg
        channels = cfg.vision.n_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels or len(pixel_values) != len(sizes):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected [{len(sizes)}, {channels}, "
                             "height, width]: one padded image per image_sizes row, from the same processor call.")
        height, width = pixel_values.shape[2:]
        too_big = [tuple(s) for s in sizes.tolist() if s[0] > height or s[1] > width]
        if too_big:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but image_sizes {too_big} exceed the "
                             f"pixel_values' {height}x{width}; pass image_sizes from the same processor call as "
                             "pixel_values.")
        grids = token_grids(sizes, cfg.token_size)
        return ImagePlan(tuple(r * c for r, c in grids), sizes)

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device), plan.detail)

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        if not image_mask.any():
            return ImageLayout(())
        sizes = image_sizes_of(extras)
        grids = token_grids(sizes, model.vlm_cfg.token_size)
        originals = extras.get("original_sizes")
        if originals is not None and len(originals) != len(grids):
            raise ValueError(f"original_sizes has {len(originals)} rows but image_sizes {len(grids)}; pass both from "
                             "the same processor call.")
        spans, k = [], 0
        for b in range(image_mask.shape[0]):
            positions = image_mask[b].nonzero().flatten().cpu()
            used = 0
            while used < len(positions):
                if k == len(grids):
                    raise ValueError(f"batch row {b} has more image tokens than the {len(grids)} image(s) of "
                                     "image_sizes take; give one image_sizes row per image.")
                rows, cols = grids[k]
                chunk = positions[used:used + rows * cols]
                original = None if originals is None else tuple(int(v) for v in originals[k])
                spans.append(_span(b, k, chunk, grids[k], len(image_mask[b]), sizes[k], original))
                used, k = used + rows * cols, k + 1
        if k != len(grids):
            raise ValueError(f"image_sizes describes {len(grids)} images but the tokens hold {k}.")
        return ImageLayout(tuple(spans))


class Mistral3Pipeline(PixtralPipeline):
    """Pixtral tower, Mistral 3's projector with the patch merger."""

    def build(self, model: HookedVLM) -> None:
        model.vision = HookedPixtralVision(model.vlm_cfg, dtype=model.cfg.dtype)
        model.projector = Mistral3Projector(model.vlm_cfg, model.cfg.d_model, model.vision.cfg)


def _span(batch: int, k: int, chunk: torch.Tensor, shape: tuple[int, int], length: int, size: torch.Tensor,
          original: tuple[int, int] | None) -> ImageSpan:
    """Image ``k``: ``rows`` runs of ``cols`` consecutive image tokens, one break token between runs."""
    rows, cols = shape
    expected = (torch.arange(rows)[:, None] * (cols + 1) + torch.arange(cols)[None, :]).flatten()
    if len(chunk) < rows * cols or not torch.equal(chunk - chunk[0], expected):
        raise ValueError(f"batch row {batch}: image {k} ({rows}x{cols} tokens) takes {rows} rows of {cols} image tokens, "
                         "each followed by one [IMG_BREAK]/[IMG_END] token, which the tokens do not hold; expand "
                         "prompts with model.prepare.")
    grid = chunk.reshape(rows, cols)
    start, end = int(grid[0, 0]), int(grid[-1, -1]) + 1
    breaks = grid[:-1, -1] + 1
    markers = torch.tensor([end] if end < length else [], dtype=torch.long)
    boxes = None
    if original is not None:
        boxes = torch.full((end - start, 4), float("nan"), dtype=torch.float64)
        boxes[grid.flatten() - start] = token_boxes(shape, tuple(int(v) for v in size), original)
    return ImageSpan(batch=batch, start=start, end=end, grid=grid, extra=breaks, newlines=breaks, markers=markers,
                     boxes=boxes, text=breaks)
