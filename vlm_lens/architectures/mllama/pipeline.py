"""Mllama image pipeline: images are read through cross-attention, never written into the sequence.

- ``build``: the tower, the projector and ``CrossAttentionBlock`` at each of ``cross_attention_layers``.
- ``plan``: checks the processor's tensors (``pixel_values`` [batch, max_images, tiles, C, H, W],
  ``aspect_ratio_ids``, ``aspect_ratio_mask``, ``cross_attention_mask``); each real image slot (aspect-ratio id
  > 0) is one image, and one ``<|image|>`` token stands for it (``tokens_per_image`` is 1 each: the token stays
  a text token, as ``splices_images = False`` tells the core).
- ``features``: the tower on the real images only (a row's result does not depend on the rest of the batch);
  it also puts the key layout (``CrossKeys``) in ``ImagePlan.side_outputs`` for the cross-attention blocks.
- ``layout``: one span per image on the *key axis* of its row (image ``j`` of a row holds keys
  ``[j * K, (j + 1) * K)``, ``K = tiles * (1 + patches)``); ``grid(i)`` is the image's patch grid over its tiles
  (tile rows x tile cols from the aspect ratio), ``extra`` the class-token keys and the padding tiles' keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.architectures.mllama.config import MllamaConfig
from vlm_lens.architectures.mllama.cross_attention import CROSS, CrossAttentionBlock, CrossKeys
from vlm_lens.architectures.mllama.projector import MllamaProjector
from vlm_lens.architectures.mllama.vision import HookedMllamaVision
from vlm_lens.layout import ImageLayout, ImageSpan
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM

EXTRAS = ("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


@dataclass(frozen=True)
class MllamaImages:
    real: torch.Tensor  # bool [batch, max_images]: slots that hold an image
    aspect_ratio_ids: torch.Tensor  # [batch, max_images]
    aspect_ratio_mask: torch.Tensor  # [batch, max_images, tiles]
    cross_attention_mask: torch.Tensor  # [batch, pos, max_images, tiles]


class MllamaPipeline(ImagePipeline):
    extra_keys = EXTRAS
    splices_images = False
    supports_start_at_layer = False  # a residual passed in alone would skip the images' cross-attention
    key_axis_hooks = (".cross_attn.hook_k", ".cross_attn.hook_v", ".cross_attn.k_norm.")  # [batch, keys, ...]

    def build(self, model: HookedVLM) -> None:
        vlm_cfg: MllamaConfig = model.vlm_cfg
        model.vision = HookedMllamaVision(vlm_cfg, dtype=model.cfg.dtype)
        model.projector = MllamaProjector(vlm_cfg.vision.vision_output_dim, model.cfg.d_model, model.cfg.dtype)
        for layer in vlm_cfg.cross_attention_layers:
            model.blocks[layer] = CrossAttentionBlock(model.cfg, layer)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        missing = [k for k in EXTRAS if extras.get(k) is None]
        if missing:
            raise ValueError(f"Mllama needs {', '.join(missing)} with pixel_values (the processor's outputs); build "
                             "the input with model.prepare(prompt, images=[...]).")
        v = model.vlm_cfg.vision
        tile = (v.max_tiles, v.n_channels, v.image_size, v.image_size)
        if pixel_values.ndim != 6 or tuple(pixel_values.shape[2:]) != tile:
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; Mllama takes [batch, max_images, "
                             f"{', '.join(map(str, tile))}] (tiles, channels, height, width) as its processor makes them.")
        ids, armask, xmask = (torch.as_tensor(extras[k]) for k in EXTRAS)
        batch, slots = pixel_values.shape[:2]
        if ids.shape != (batch, slots) or armask.shape != (batch, slots, v.max_tiles) \
                or xmask.ndim != 4 or xmask.shape[0] != batch or xmask.shape[2:] != (slots, v.max_tiles):
            raise ValueError(f"aspect_ratio_ids {tuple(ids.shape)}, aspect_ratio_mask {tuple(armask.shape)} and "
                             f"cross_attention_mask {tuple(xmask.shape)} do not match pixel_values "
                             f"{tuple(pixel_values.shape)}; pass the processor's outputs together.")
        real = ids > 0
        if (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError("aspect_ratio_ids has an image slot after an empty one (id 0); each row's images must "
                             "come first, as the processor puts them.")
        if int(ids.max()) > len(v.aspect_ratios):
            raise ValueError(f"aspect_ratio_ids up to {int(ids.max())}, but the tower knows {len(v.aspect_ratios)} "
                             "aspect ratios; use the checkpoint's image processor (same max_image_tiles).")
        detail = MllamaImages(real, ids, armask, xmask)
        return ImagePlan(tokens_per_image=(1,) * int(real.sum()), detail=detail)

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        d: MllamaImages = plan.detail
        device = model.cfg.device
        real = d.real.to(pixel_values.device)
        features = model.vision(pixel_values[real].to(device), d.aspect_ratio_ids.to(device)[d.real.to(device)],
                                d.aspect_ratio_mask.to(device)[d.real.to(device)])
        tiles = model.vlm_cfg.vision.max_tiles
        plan.side_outputs[CROSS] = CrossKeys(
            images_per_row=d.real.sum(1).tolist(), keys_per_image=model.vlm_cfg.keys_per_image, tiles=tiles,
            tile_mask=d.cross_attention_mask.flatten(2).to(device).bool())
        return features

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        ids = extras.get("aspect_ratio_ids")
        if ids is None:
            return ImageLayout(spans=(), axis="keys")
        v = model.vlm_cfg.vision
        keys, positions, g = model.vlm_cfg.keys_per_image, v.n_tile_positions, v.grid_size
        spans = []
        for b, row in enumerate(torch.as_tensor(ids).tolist()):
            for j, ratio in enumerate(r for r in row if r > 0):
                tile_rows, tile_cols = v.aspect_ratios[ratio - 1]
                start = j * keys
                r, c = torch.meshgrid(torch.arange(tile_rows * g), torch.arange(tile_cols * g), indexing="ij")
                tile = (r // g) * tile_cols + c // g
                grid = start + tile * positions + 1 + (r % g) * g + c % g
                on_grid = torch.zeros(keys, dtype=torch.bool)
                on_grid[grid.flatten() - start] = True
                extra = (~on_grid).nonzero().flatten() + start
                spans.append(ImageSpan(batch=b, start=start, end=start + keys, grid=grid, extra=extra))
        return ImageLayout(spans=tuple(spans), axis="keys")
