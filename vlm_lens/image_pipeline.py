"""Image pipelines: how an architecture turns pixels into the embeddings spliced into the sequence.

A pipeline is a plain object (not a module) that drives the model's own hooked modules
(``vision``, ``projector``, hook points), so hook names never depend on the pipeline. One pipeline
per family, chosen by ``VLMConfig.pipeline``; the core only calls the methods of ``ImagePipeline``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.layout import ImageLayout, build_layout

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


class ImagePipeline:
    """Interface. ``extras`` holds the per-architecture inputs (e.g. ``image_sizes``)."""

    extra_keys: tuple[str, ...] = ()
    # False where the LM's positions come from the pipeline (e.g. M-RoPE), which a residual passed in
    # with start_at_layer cannot carry.
    supports_start_at_layer: bool = True

    def check(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> list[int]:
        """Validate the pixels and return the number of sequence tokens each image takes."""
        raise NotImplementedError

    def encode(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        """[total_image_tokens, d_model] in sequence order; fires the vision/projector hooks."""
        raise NotImplementedError

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        raise NotImplementedError

    def install(self, model: HookedVLM) -> None:
        """Called once at the end of ``HookedVLM.__init__``, before the fast components and hook points are
        set up: an architecture may swap in its own modules here. Default: nothing."""

    def forward_context(self, model: HookedVLM, tokens: torch.Tensor, image_mask: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, past_kv_cache: Any,
                        extras: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Entered around the language model's forward pass, e.g. to set per-call position ids.
        ``image_mask``: the positions that receive image embeddings in this call (None: no image; during
        generation without a KV cache it covers the prompt only). Default: nothing."""
        return contextlib.nullcontext()


class LlavaPipeline(ImagePipeline):
    """LLaVA-1.5: one fixed-size tile per image, every visual token on one square grid."""

    def check(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> list[int]:
        model.vision.check_pixels(pixel_values)
        return [model.vlm_cfg.n_image_tokens] * pixel_values.shape[0]

    def encode(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> torch.Tensor:
        features = model.hook_image_features(model.vision(pixel_values.to(model.cfg.device)))
        embeds = model.hook_image_embeds(model.projector(features))  # [n_images, n_tokens, d_model]
        return embeds.reshape(-1, embeds.shape[-1])

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        cfg = model.vlm_cfg
        grid = cfg.vision.grid_size
        return build_layout(image_mask, cfg.n_image_tokens, (grid, grid),
                            n_leading_extra=cfg.n_image_tokens - grid * grid)


# Pipelines in other modules subclass ImagePipeline, so they are imported when first built.
def _anyres() -> ImagePipeline:
    from vlm_lens.pipelines_anyres import AnyResPipeline

    return AnyResPipeline()


def _anyres_max() -> ImagePipeline:
    from vlm_lens.pipelines_anyres import AnyResMaxPipeline

    return AnyResMaxPipeline()


def _qwen2_5_vl() -> ImagePipeline:
    from vlm_lens.pipelines_qwen2_5_vl import Qwen2_5_VLPipeline

    return Qwen2_5_VLPipeline()


PIPELINES: dict[str, Callable[[], ImagePipeline]] = {
    "llava": LlavaPipeline, "anyres": _anyres, "anyres_max": _anyres_max, "qwen2_5_vl": _qwen2_5_vl,
}


def build_pipeline(name: str) -> ImagePipeline:
    if name not in PIPELINES:
        raise ValueError(f"Unknown image pipeline {name!r}; known: {', '.join(sorted(PIPELINES))}.")
    return PIPELINES[name]()
