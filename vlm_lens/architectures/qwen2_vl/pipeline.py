"""Qwen2-VL image pipeline: Qwen2.5-VL's (``Qwen2_5_VLPipeline``: images of any size, one merged-token grid
each, the patch merger, M-RoPE positions, layout with ``<|vision_start|>``/``<|vision_end|>`` markers and
boxes) around Qwen2-VL's windowless LayerNorm tower."""

from __future__ import annotations

from vlm_lens.architectures.qwen2_5_vl.pipeline import Qwen2_5_VLPipeline
from vlm_lens.architectures.qwen2_vl.vision import HookedQwen2VLVision


class Qwen2VLPipeline(Qwen2_5_VLPipeline):
    """The Qwen2.5-VL pipeline with ``HookedQwen2VLVision``; the merger's ``ln_q`` follows it (LayerNorm)."""

    vision_class = HookedQwen2VLVision
