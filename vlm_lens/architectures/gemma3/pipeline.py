"""Gemma 3 image pipeline: one SigLIP tile per image, pooled to a square grid of ``mm_tokens_per_image`` tokens.

The processor resizes every image (no crop, no padding) to the tower's square tile and writes each image
as ``<start_of_image>`` + ``mm_tokens_per_image`` image tokens + ``<end_of_image>``.

- ``encode``: SigLIP tower with its final norm -> ``hook_image_features`` -> pooling projector ->
  ``hook_image_embeds`` [n_images, n_tokens, d_model].
- ``layout``: per image its pooled ``grid``, the ``markers`` (the positions just before and after the image,
  where the prompt format has ``<start_of_image>`` / ``<end_of_image>``: the layout sees the image mask, not
  the token ids, so hand-made tokens must follow that format) and ``boxes`` when the original image sizes are
  known (``image_sizes``, added by ``Gemma3FlatProcessor``).
- Attention: every language-model layer gets the image-block overlay (``mask``). ``start_at_layer`` is
  refused: a residual passed in carries no image positions, so the mask could not be built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens._tl.components import with_attention_overlay
from vlm_lens.architectures.gemma3.mask import image_block_overlay
from vlm_lens.architectures.gemma3.modules import Gemma3Projector, HookedGemma3Vision
from vlm_lens.layout import ImageLayout, ImageSpan, split_image_tokens
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def token_boxes(size: tuple[int, int], side: int) -> torch.Tensor:
    """[side * side, 4] (top, left, bottom, right) in original pixels: the whole image is stretched onto the
    tile, so token (r, c) covers row band r and column band c of ``side`` equal bands."""
    height, width = size
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    step_y, step_x = height / side, width / side
    return torch.stack([rows * step_y, cols * step_x, (rows + 1) * step_y, (cols + 1) * step_x], dim=1)


class Gemma3Pipeline(ImagePipeline):
    """SigLIP tile -> pooled grid; bidirectional attention inside each image."""

    supports_start_at_layer = False

    def build(self, model: HookedVLM) -> None:
        model.vision = HookedGemma3Vision(model.vlm_cfg, dtype=model.cfg.dtype)
        model.projector = Gemma3Projector(model.vlm_cfg, model.cfg.d_model, model.vision.cfg)
        for block in model.blocks:
            with_attention_overlay(block.attn, image_block_overlay)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        model.vision.check_pixels(pixel_values)
        return ImagePlan((model.vlm_cfg.mm_tokens_per_image,) * pixel_values.shape[0])

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        cfg = model.vlm_cfg
        n, total = cfg.mm_tokens_per_image, int(image_mask.sum())
        if total % n:
            raise ValueError(f"The tokens hold {total} image tokens, not a multiple of the {n} tokens one Gemma 3 "
                             "image takes; expand prompts with model.prepare.")
        n_images = total // n
        sizes = extras.get("image_sizes")
        sizes = None if sizes is None else [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]
        if sizes is not None and len(sizes) != n_images:
            raise ValueError(f"image_sizes has {len(sizes)} rows but the tokens hold {n_images} images of {n} tokens; "
                             "pass image_sizes from the processor call that made the tokens.")
        spans = []
        for b, k, chunk in split_image_tokens(image_mask, [n] * n_images, "the image tokens", lambda k: f"{n} tokens"):
            start, end = int(chunk[0]), int(chunk[-1]) + 1
            row = image_mask[b]
            markers = [p for p in (start - 1, end) if 0 <= p < len(row) and not bool(row[p])]
            spans.append(ImageSpan(
                batch=b, start=start, end=end, grid=chunk.reshape(cfg.tokens_per_side, cfg.tokens_per_side),
                markers=torch.tensor(markers, dtype=torch.long),
                boxes=None if sizes is None else token_boxes(sizes[k], cfg.tokens_per_side)))
        return ImageLayout(tuple(spans))
