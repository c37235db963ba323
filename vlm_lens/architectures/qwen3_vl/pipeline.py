"""Qwen3-VL image pipeline: Qwen2.5-VL's (images of any size, one merged-token grid each, 3-D positions),
with its own tower and mergers, the deepstack features and interleaved M-RoPE.

- ``build``: the tower, the projector (``Qwen3PatchMerger``), ``model.deepstack`` (one merger per deepstack
  layer), ``DeepstackBlock`` in place of the first language-model blocks, and M-RoPE in every attention layer.
- ``features``: the tower's output for ``hook_image_features``; the deepstack mergers run here too, and their
  outputs go to ``ImagePlan.side_outputs`` (hence to ``CallContext.side_outputs``) for the deepstack blocks.
- ``plan``, ``layout``: Qwen2.5-VL's (``image_grid_thw``, markers, boxes).
- ``positions``: Qwen2.5-VL's position ids, rotated with the interleaved frequencies (``mrope``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformer_lens.components import GroupedQueryAttention

from vlm_lens._tl.components import with_external_rotary
from vlm_lens.architectures.qwen2_5_vl.mrope import MRopePositions, mrope_rotary
from vlm_lens.architectures.qwen2_5_vl.pipeline import Qwen2_5_VLPipeline
from vlm_lens.architectures.qwen3_vl.deepstack import DEEPSTACK, DeepstackBlock
from vlm_lens.architectures.qwen3_vl.merger import Qwen3PatchMerger
from vlm_lens.architectures.qwen3_vl.mrope import interleaved_cos_sin
from vlm_lens.architectures.qwen3_vl.vision import HookedQwen3VLVision
from vlm_lens.pipeline import ImagePlan

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM


class Qwen3VLPipeline(Qwen2_5_VLPipeline):
    """Full-attention tower with learned positions, deepstack mergers and interleaved M-RoPE."""

    def build(self, model: HookedVLM) -> None:
        vlm_cfg, d_model = model.vlm_cfg, model.cfg.d_model
        for layer in range(vlm_cfg.n_deepstack):
            model.blocks[layer] = DeepstackBlock(model.cfg, layer)
        model.vision = HookedQwen3VLVision(vlm_cfg, dtype=model.cfg.dtype)
        model.projector = Qwen3PatchMerger(vlm_cfg, d_model, model.vision.cfg)
        model.deepstack = nn.ModuleList(Qwen3PatchMerger(vlm_cfg, d_model, model.vision.cfg, postshuffle=True)
                                        for _ in range(vlm_cfg.n_deepstack))
        for i, block in enumerate(model.blocks):
            if not isinstance(block.attn, GroupedQueryAttention):
                raise ValueError(f"blocks.{i}.attn is a {type(block.attn).__name__}; M-RoPE needs TransformerLens's "
                                 "GroupedQueryAttention (a Qwen3 language model).")
            with_external_rotary(block.attn, mrope_rotary)

    def features(self, model: HookedVLM, pixel_values: torch.Tensor, plan: ImagePlan) -> torch.Tensor:
        features, deepstack = model.vision(pixel_values.to(model.cfg.device), plan.detail.to(model.cfg.device))
        plan.side_outputs[DEEPSTACK] = [merger(x) for merger, x in zip(model.deepstack, deepstack)]
        return features

    def positions(self, model: HookedVLM, tokens: torch.Tensor, image_mask: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, past_kv_cache: Any, history: Any,
                  extras: dict[str, Any]) -> MRopePositions:
        ids = super().positions(model, tokens, image_mask, attention_mask, past_kv_cache, history, extras).ids
        cfg = model.cfg
        return MRopePositions(ids, *interleaved_cos_sin(ids, cfg.d_head, cfg.rotary_base, model.vlm_cfg.mrope_section,
                                                        cfg.dtype))
