"""LLaVA-NeXT's image path: a base tile plus pinpoint crops per image, unpadded, a newline after every row.

The tiling geometry is shared with LLaVA-OneVision and lives in ``vlm_lens.anyres``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.anyres import TilePlan, pack, plan_image, token_boxes
from vlm_lens.architectures.llava.pipeline import LlavaPipeline
from vlm_lens.layout import ImageLayout, ImageSpan, split_image_tokens
from vlm_lens.pipeline import ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


class AnyResPipeline(LlavaPipeline):
    """LLaVA-NeXT: a base tile plus pinpoint crops per image, unpadded, a newline after every row."""

    extra_keys: tuple[str, ...] = ("image_sizes",)

    def build(self, model: HookedVLM) -> None:
        """LLaVA's tower and projector, plus the learned ``image_newline`` that ends every row."""
        super().build(model)
        model.image_newline = torch.nn.Parameter(torch.empty(model.cfg.d_model, dtype=model.cfg.dtype))

    def plans(self, model: HookedVLM, extras: dict[str, Any]) -> list[TilePlan]:
        sizes, cfg = _image_sizes(extras), model.vlm_cfg
        return [plan_image(cfg.vision, cfg.image_grid_pinpoints, cfg.max_crop_tiles, size, tiled)
                for size, tiled in zip(sizes, self._tiled(extras, len(sizes)))]

    def _tiled(self, extras: dict[str, Any], n_images: int) -> list[bool]:
        return [True] * n_images

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        plans = self.plans(model, extras)
        return ImagePlan(tuple(p.n_tokens for p in plans), (plans, _tiles(model, pixel_values, plans)))

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Every tile of every image through the tower: [n_tiles, n_patches, d_features]."""
        return model.vision(plan.detail[1].to(model.cfg.device))

    def pack(self, model: HookedVLM, embeds: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Projected tiles -> per image the base grid, then the unpadded crop grid with row newlines."""
        plans = plan.detail[0]
        per_image = embeds.split([p.n_tiles for p in plans])
        return torch.cat([pack(p, e, model.image_newline) for p, e in zip(plans, per_image)])

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        plans = self.plans(model, extras) if image_mask.any() else []
        spans = [_span(b, chunk, plans[k]) for b, k, chunk in split_image_tokens(
            image_mask, [p.n_tokens for p in plans], "image_sizes", lambda k: f"size {plans[k].size}")]
        return ImageLayout(tuple(spans))


def _image_sizes(extras: dict[str, Any]) -> list[tuple[int, int]]:
    sizes = extras.get("image_sizes")
    if sizes is None:
        raise ValueError("Any-resolution models need image_sizes (each image's original (height, width)): pass "
                         "image_sizes=... with tokens and pixel_values, or build inputs with model.prepare(...).")
    sizes = torch.as_tensor(sizes)
    if sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes has shape {tuple(sizes.shape)}; expected [n_images, 2] (height, width).")
    return [(int(h), int(w)) for h, w in sizes.tolist()]


def _tiles(model: HookedVLM, pixel_values: torch.Tensor, plans: list[TilePlan]) -> torch.Tensor:
    """All images' tiles stacked [n_tiles, channels, tile, tile], dropping the processor's batch padding."""
    need = [p.n_tiles for p in plans]
    if pixel_values.ndim == 5 and pixel_values.shape[0] == len(plans) and pixel_values.shape[1] >= max(need, default=0):
        tiles = torch.cat([pv[:n] for pv, n in zip(pixel_values, need)])
    elif pixel_values.ndim == 4 and pixel_values.shape[0] == sum(need):
        tiles = pixel_values
    else:
        raise ValueError(
            f"pixel_values has shape {tuple(pixel_values.shape)}, but image_sizes describes {len(plans)} image(s) "
            f"of {need} tiles (base + crops) each. Pass the processor's [n_images, max_tiles, 3, H, W] (or all "
            "tiles stacked [n_tiles, 3, H, W]) with image_sizes from the same call."
        )
    model.vision.check_pixels(tiles)
    return tiles


def _span(batch: int, chunk: torch.Tensor, plan: TilePlan) -> ImageSpan:
    n_base = plan.side**2
    rest = chunk[n_base:]
    if plan.canvas is None:
        crop_grid, newlines = None, rest
    else:
        rows = rest.reshape(plan.shape[0], plan.shape[1] + 1)
        crop_grid, newlines = rows[:, :-1].contiguous(), rows[:, -1].contiguous()
    return ImageSpan(batch=batch, start=int(chunk[0]), end=int(chunk[-1]) + 1,
                     grid=chunk[:n_base].reshape(plan.side, plan.side), extra=newlines, crop_grid=crop_grid,
                     newlines=newlines, boxes=token_boxes(plan))
