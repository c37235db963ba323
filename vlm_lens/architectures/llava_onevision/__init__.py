"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's tiling with ``anyres_max_N``
downsampling, usually a SigLIP tower and a Qwen2 language model. Images only (no video).

- ``pipeline``: ``AnyResMaxPipeline`` (NeXT's plus downsampling and multi-image samples)
- ``processor``: the processor shim without a video processor (no torchvision)
- ``testing``: tiny seeded checkpoints and a hypothesis strategy
Config and weights are LLaVA-NeXT's (``AnyResConfig``, ``convert_anyres``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.architectures.llava_next.config import AnyResConfig, anyres_configs
from vlm_lens.architectures.llava_next.convert import convert_anyres
from vlm_lens.architectures.llava_onevision.pipeline import AnyResMaxPipeline
from vlm_lens.architectures.llava_onevision.processor import LlavaOnevisionImageProcessor
from vlm_lens.architectures.registry import ArchitectureSpec, register


def llava_onevision_configs(hf_config: Any, dtype: torch.dtype, device: str
                            ) -> tuple[HookedTransformerConfig, AnyResConfig]:
    return anyres_configs(hf_config, dtype, device, architecture="LlavaOnevisionForConditionalGeneration",
                          vision_aspect_ratio=hf_config.vision_aspect_ratio)


def load_processor(name_or_path: str, **hf_kwargs: Any) -> LlavaOnevisionImageProcessor:
    return LlavaOnevisionImageProcessor.from_pretrained(name_or_path, **hf_kwargs)


SPEC = register(ArchitectureSpec(
    name="LlavaOnevisionForConditionalGeneration",
    build_configs=llava_onevision_configs,
    convert_weights=convert_anyres,
    pipeline=AnyResMaxPipeline,
    load_processor=load_processor,
), family=__name__)
