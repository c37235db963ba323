"""InternVL image pipeline: every tile of every image through InternViT, pixel shuffle, projector.

Inputs as the processor gives them: ``pixel_values`` [n_tiles, 3, tile, tile], the tiles of all images stacked in
sequence order (crops row by row, then the thumbnail); ``tile_grid`` and ``image_sizes`` (added by the processor
shim) only feed the layout (``tiles``).

``hook_image_features`` and ``projector.*`` are [n_tiles, tokens_per_tile, ...]; ``hook_image_embeds`` is
[n_tiles, tokens_per_tile, d_model], tiles in sequence order (each tile is one span of the layout). The
language model is a plain Qwen2 or Llama (1-D rotary, causal), so positions are TransformerLens's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.architectures.idefics3.tiles import tiles_per_image
from vlm_lens.architectures.internvl.projector import InternVLProjector
from vlm_lens.architectures.internvl.tiles import internvl_tile_layout
from vlm_lens.architectures.internvl.vision import HookedInternViT
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


class InternVLPipeline(ImagePipeline):
    """InternViT per tile -> pixel shuffle -> LayerNorm + MLP projector; one layout span per tile."""

    extra_keys: tuple[str, ...] = ("tile_grid", "image_sizes")

    def build(self, model: HookedVLM) -> None:
        cfg = model.vlm_cfg
        model.vision = HookedInternViT(cfg, dtype=model.cfg.dtype)
        model.projector = InternVLProjector(cfg.d_image_features, model.cfg.d_model, cfg.projector_act,
                                            model.vision.cfg)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        model.vision.check_pixels(pixel_values)
        grid = _pairs(extras, "tile_grid")
        if grid is not None and sum(tiles_per_image(grid)) != len(pixel_values):
            raise ValueError(f"tile_grid {grid.tolist()} describes {sum(tiles_per_image(grid))} tiles (crops plus a "
                             f"thumbnail each, or one tile for (0, 0)) but pixel_values holds {len(pixel_values)}; "
                             "pass both from one processor call.")
        return ImagePlan((model.vlm_cfg.tokens_per_tile,) * len(pixel_values))

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        if not image_mask.any():
            return ImageLayout(())
        return internvl_tile_layout(image_mask.cpu(), model.vlm_cfg.tile_side, _pairs(extras, "tile_grid"),
                                    _pairs(extras, "image_sizes"))
