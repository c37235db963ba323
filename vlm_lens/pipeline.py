"""The interface a family implements so the core can run its images: ``ImagePipeline``.

``HookedVLM`` owns the hook skeleton, the same for every family::

    pixels -> pipeline.features -> hook_image_features -> projector -> pipeline.pack -> hook_image_embeds
           -> written over the image-token positions -> hook_embed -> the language model

A pipeline supplies the pieces (building its tower and projector, validating pixels, running the tower,
packing projected tiles into sequence order, the layout, position ids) and never fires the core's hooks
itself, so hook names and their order do not depend on the family. One pipeline object per model, made from
the model's config (an ``ArchitectureSpec.pipeline`` may pick the class by config); it keeps no per-call state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlm_lens.config import VLMConfig
from vlm_lens.layout import ImageLayout

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


@dataclass(frozen=True)
class ImagePlan:
    """A validated batch of images: sequence tokens per image, plus whatever the family needs later.

    ``side_outputs`` is filled while the images are encoded with what the language model's own modules read
    besides the image embeddings (e.g. deepstack features from intermediate tower layers); it travels with the embeddings into
    ``CallContext.side_outputs``, also on every ``generate`` step that covers the prompt.
    """

    tokens_per_image: tuple[int, ...]
    detail: Any = None
    side_outputs: dict[str, Any] = field(default_factory=dict)


class ImagePipeline:
    """Interface; ``extras`` holds the per-architecture inputs (e.g. ``image_sizes``)."""

    extra_keys: tuple[str, ...] = ()
    # False where the LM's positions or attention mask come from the image positions (e.g. M-RoPE, bidirectional
    # image blocks), which a residual passed in with start_at_layer cannot carry.
    supports_start_at_layer: bool = True
    # False where images enter the language model only through the family's own modules (cross-
    # attention layers): each image has one placeholder token (``tokens_per_image`` 1), which stays a text token;
    # nothing is written over the sequence, and ``CallContext.image_embeds`` / ``side_outputs`` reach every call,
    # ``generate``'s KV-cached steps included.
    splices_images: bool = True
    # Fragments of language-model hook names whose dimension 1 indexes image keys, not sequence positions
    # (cross-attention keys and values): run_with_cache's pos_slice / image_tokens_only keep them whole.
    key_axis_hooks: tuple[str, ...] = ()

    def __init__(self, vlm_cfg: VLMConfig | None = None) -> None:
        """``vlm_cfg``: the model's config, which the spec's factory has already used to choose this class; the
        methods read it from the model they are given, so the pipeline holds nothing."""

    def build(self, model: HookedVLM) -> None:
        """Create ``model.vision`` and ``model.projector`` (and any other module of the family), once, in
        ``HookedVLM.__init__`` before hook points are set up."""
        raise NotImplementedError

    def plan(self, model: HookedVLM, pixel_values: torch.Tensor, extras: dict[str, Any]) -> ImagePlan:
        """Validate the pixels (a ``ValueError`` naming the fix) before anything runs."""
        raise NotImplementedError

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """The vision tower's output, what ``hook_image_features`` sees and the projector reads."""
        raise NotImplementedError

    def pack(self, model: HookedVLM, embeds: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        """Projected features -> what ``hook_image_embeds`` sees: [n_images, n_tokens, d_model], or
        [total_image_tokens, d_model] in sequence order. Default: unchanged."""
        return embeds

    def layout(self, model: HookedVLM, image_mask: torch.Tensor, extras: dict[str, Any]) -> ImageLayout:
        raise NotImplementedError

    def processed_size(self, extras: dict[str, Any], image: int) -> tuple[int, int] | None:
        """(height, width) of image ``image`` inside its ``pixel_values`` entry where the processor pads a
        batch's images to the largest; None where the entry is the image."""
        return None

    def positions(self, model: HookedVLM, tokens: torch.Tensor, image_mask: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, past_kv_cache: Any, history: Any,
                  extras: dict[str, Any]) -> Any:
        """Position ids of the call's keys for the family's attention (None: TransformerLens's own).

        ``image_mask`` marks the positions that receive image embeddings in this call (None: no image);
        ``history`` is what this returned on the previous call of the same ``generate`` (None otherwise).
        """
        return None
