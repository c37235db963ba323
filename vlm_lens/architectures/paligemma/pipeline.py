"""PaliGemma image pipeline: one SigLIP tile per image, every patch one image token.

The processor resizes every image (no crop, no padding) to the tower's square tile and writes a prompt as
``<image>`` x n_tokens per image, ``<bos>``, the prefix text, ``\\n``, then the suffix (if any) and ``<eos>``;
``token_type_ids`` mark the suffix.

- ``features``: SigLIP tower with its final norm -> ``hook_image_features`` -> linear projector ->
  ``hook_image_embeds`` [n_images, n_tokens, d_model].
- ``plan``: also reads ``token_type_ids`` (an extra input) into ``side_outputs["prefix"]`` for the prefix-LM mask.
- ``layout``: per image its square patch grid, and ``boxes`` when the original image sizes are known
  (``image_sizes``, added by ``PaliGemmaFlatProcessor``).
- Attention: every language-model layer gets the prefix overlay (``mask``), outside the sliding window as in
  transformers. ``start_at_layer`` is refused: a residual passed in carries no prefix, so the mask could not be
  built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens._tl.components import with_attention_overlay
from vlm_lens.architectures.gemma3.modules import HookedGemma3Vision
from vlm_lens.architectures.gemma3.pipeline import token_boxes
from vlm_lens.architectures.paligemma.mask import PREFIX, prefix_from_token_type_ids, prefix_overlay
from vlm_lens.architectures.paligemma.modules import PaliGemmaProjector
from vlm_lens.layout import ImageLayout, ImageSpan, split_image_tokens
from vlm_lens.pipeline import ImagePipeline, ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


class PaliGemmaPipeline(ImagePipeline):
    """SigLIP tile -> linear projector; prefix-LM attention in the language model."""

    extra_keys = ("token_type_ids", "image_sizes")
    supports_start_at_layer = False

    def build(self, model: HookedVLM) -> None:
        model.vision = HookedGemma3Vision(model.vlm_cfg, dtype=model.cfg.dtype)
        model.projector = PaliGemmaProjector(model.vlm_cfg.vision.d_model, model.cfg.d_model, dtype=model.cfg.dtype)
        for block in model.blocks:
            with_attention_overlay(block.attn, prefix_overlay, within_window=False)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        model.vision.check_pixels(pixel_values)
        prefix = prefix_from_token_type_ids(extras.get("token_type_ids"))
        return ImagePlan((model.vlm_cfg.n_image_tokens,) * pixel_values.shape[0], side_outputs={PREFIX: prefix})

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        cfg = model.vlm_cfg
        n, side = cfg.n_image_tokens, cfg.vision.grid_size
        total = int(image_mask.sum())
        if total % n:
            raise ValueError(f"The tokens hold {total} image tokens, not a multiple of the {n} tokens one PaliGemma "
                             "image takes; expand prompts with model.prepare.")
        n_images = total // n
        sizes = extras.get("image_sizes")
        sizes = None if sizes is None else [tuple(int(v) for v in s) for s in torch.as_tensor(sizes).tolist()]
        if sizes is not None and len(sizes) != n_images:
            raise ValueError(f"image_sizes has {len(sizes)} rows but the tokens hold {n_images} images of {n} tokens; "
                             "pass image_sizes from the processor call that made the tokens.")
        spans = []
        for b, k, chunk in split_image_tokens(image_mask, [n] * n_images, "the image tokens", lambda k: f"{n} tokens"):
            spans.append(ImageSpan(batch=b, start=int(chunk[0]), end=int(chunk[-1]) + 1, grid=chunk.reshape(side, side),
                                   boxes=None if sizes is None else token_boxes(sizes[k], side)))
        return ImageLayout(tuple(spans))
