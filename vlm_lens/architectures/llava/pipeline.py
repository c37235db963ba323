"""LLaVA-1.5's image path: one fixed-size tile per image, every visual token on one square grid; with a Pixtral
tower (Pixtral-12B), the Pixtral pipeline (images of any size, ``[IMG_BREAK]``/``[IMG_END]``) and the same
projector. ``llava_pipeline`` picks one by config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.architectures.llava.config import LlavaPixtralConfig
from vlm_lens.architectures.pixtral.pipeline import PixtralPipeline
from vlm_lens.architectures.pixtral.vision import HookedPixtralVision
from vlm_lens.config import VLMConfig
from vlm_lens.layout import ImageLayout, build_layout
from vlm_lens.pipeline import ImagePipeline, ImagePlan
from vlm_lens.projector import LlavaProjector
from vlm_lens.vision import TOWERS

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


def llava_projector(model: HookedVLM) -> LlavaProjector:
    cfg = model.vlm_cfg
    return LlavaProjector(cfg.d_image_features, model.cfg.d_model, cfg.projector_act, cfg.projector_bias,
                          dtype=model.cfg.dtype)


class LlavaPipeline(ImagePipeline):
    """CLIP or SigLIP tower -> two-layer projector; ``hook_image_embeds`` is [n_images, n_tokens, d_model]."""

    def build(self, model: HookedVLM) -> None:
        cfg = model.vlm_cfg
        model.vision = TOWERS[cfg.vision.family](cfg, dtype=model.cfg.dtype, drop_class_token=cfg.drop_class_token)
        model.projector = llava_projector(model)

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        model.vision.check_pixels(pixel_values)
        return ImagePlan((model.vlm_cfg.n_image_tokens,) * pixel_values.shape[0])

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        return model.vision(pixel_values.to(model.cfg.device))

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        cfg = model.vlm_cfg
        grid = cfg.vision.grid_size
        return build_layout(image_mask, cfg.n_image_tokens, (grid, grid),
                            n_leading_extra=cfg.n_image_tokens - grid * grid)


class LlavaPixtralPipeline(PixtralPipeline):
    """Pixtral tower (one token per patch) -> LLaVA's two-layer projector; ``hook_image_embeds`` is
    [total_image_tokens, d_model] in sequence order, the layout Pixtral's (``[IMG_BREAK]`` rows, ``[IMG_END]``)."""

    def build(self, model: HookedVLM) -> None:
        model.vision = HookedPixtralVision(model.vlm_cfg, dtype=model.cfg.dtype)
        model.projector = llava_projector(model)


def llava_pipeline(vlm_cfg: VLMConfig) -> ImagePipeline:
    """The pipeline for a ``LlavaForConditionalGeneration`` checkpoint's config (see ``llava_configs``)."""
    return LlavaPixtralPipeline() if isinstance(vlm_cfg, LlavaPixtralConfig) else LlavaPipeline()
