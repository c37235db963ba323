"""Idefics3 / SmolVLM image pipeline: every tile of every image through the tower, pixel shuffle, projection.

Inputs as the processor gives them: ``pixel_values`` [batch, max_tiles, 3, tile, tile] with all-zero
padding tiles (HF drops them the same way) and ``pixel_attention_mask`` [batch, max_tiles, tile, tile]
(which pixels are real; a patch is real if any of its pixels is); or the real tiles stacked
[n_tiles, 3, tile, tile] with the mask [n_tiles, tile, tile] or none. ``tile_grid`` and ``image_sizes``
(added by the processor shim) only feed the layout (``tiles``).

``hook_image_features`` and ``projector.*`` are [n_tiles, tokens_per_tile, ...]; ``hook_image_embeds`` is
[n_tiles, tokens_per_tile, d_model], tiles in sequence order (each tile is one span of the layout). The
language model is plain Llama (1-D rotary, causal), so positions are TransformerLens's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.architectures.idefics3.projector import Idefics3Projector
from vlm_lens.architectures.idefics3.tiles import tile_layout, tiles_per_image
from vlm_lens.architectures.idefics3.vision import HookedIdefics3Vision
from vlm_lens.layout import ImageLayout
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def _pairs(extras: dict[str, Any], key: str) -> torch.Tensor | None:
    value = extras.get(key)
    if value is None:
        return None
    value = torch.as_tensor(value).long().cpu()
    if value.ndim != 2 or value.shape[1] != 2:
        raise ValueError(f"{key} has shape {tuple(value.shape)}; expected [n_images, 2].")
    return value


def real_tiles(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, patch: int
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tiles [n, 3, H, W], patch mask [n, H/patch, W/patch] or None) of the real tiles, as HF selects them."""
    if pixel_values.ndim == 5:
        batch, slots = pixel_values.shape[:2]
        flat = pixel_values.flatten(0, 1)
        real = flat.flatten(1).ne(0).any(dim=1)  # HF drops tiles that are entirely 0 (batch padding)
        tiles = flat[real]
        if pixel_mask is not None:
            if tuple(pixel_mask.shape) != (batch, slots, *pixel_values.shape[-2:]):
                raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, but pixel_attention_mask has "
                                 f"shape {tuple(pixel_mask.shape)}, not [{batch}, {slots}, {pixel_values.shape[-2]}, "
                                 f"{pixel_values.shape[-1]}]; pass both from one processor call.")
            pixel_mask = pixel_mask.flatten(0, 1)[real.to(pixel_mask.device)]
    elif pixel_values.ndim == 4:
        tiles = pixel_values
        if pixel_mask is not None and tuple(pixel_mask.shape) != (len(tiles), *tiles.shape[-2:]):
            raise ValueError(f"pixel_attention_mask has shape {tuple(pixel_mask.shape)}; stacked tiles "
                             f"{tuple(tiles.shape)} need [{len(tiles)}, {tiles.shape[-2]}, {tiles.shape[-1]}].")
    else:
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; pass the processor's [batch, max_tiles, "
                         "3, H, W] (or the real tiles stacked [n_tiles, 3, H, W]).")
    if pixel_mask is None:
        return tiles, None
    h, w = tiles.shape[-2] // patch, tiles.shape[-1] // patch
    pixels = pixel_mask[:, :h * patch, :w * patch].reshape(len(tiles), h, patch, w, patch)
    return tiles, pixels.ne(0).any(dim=4).any(dim=2)


class Idefics3Pipeline(ImagePipeline):
    """SigLIP-like tower per tile -> pixel shuffle -> linear projection; one layout span per tile."""

    extra_keys: tuple[str, ...] = ("pixel_attention_mask", "tile_grid", "image_sizes")

    def build(self, model: HookedVLM) -> None:
        cfg, dtype = model.vlm_cfg, model.cfg.dtype
        model.vision = HookedIdefics3Vision(cfg, dtype=dtype)
        model.projector = Idefics3Projector(cfg.d_image_features, model.cfg.d_model, dtype=dtype)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        cfg = model.vlm_cfg
        mask = extras.get("pixel_attention_mask")
        tiles, patch_mask = real_tiles(pixel_values, None if mask is None else torch.as_tensor(mask),
                                       cfg.vision.patch_size)
        model.vision.check_pixels(tiles)
        if patch_mask is not None and not patch_mask.flatten(1).any(1).all():
            raise ValueError("pixel_attention_mask marks a tile with non-zero pixels as all padding; pass the mask "
                             "from the same processor call as pixel_values.")
        grid = _pairs(extras, "tile_grid")
        if grid is not None and sum(tiles_per_image(grid)) != len(tiles):
            raise ValueError(f"tile_grid {grid.tolist()} describes {sum(tiles_per_image(grid))} tiles (crops plus a "
                             f"global image each) but pixel_values holds {len(tiles)}; pass both from one processor call.")
        return ImagePlan((cfg.tokens_per_tile,) * len(tiles), (tiles, patch_mask))

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        tiles, patch_mask = plan.detail
        device = model.cfg.device
        return model.vision(tiles.to(device), None if patch_mask is None else patch_mask.to(device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        if not image_mask.any():
            return ImageLayout(())
        return tile_layout(image_mask.cpu(), model.vlm_cfg.tile_side, _pairs(extras, "tile_grid"),
                           _pairs(extras, "image_sizes"))
