"""Which processor a ``LlavaForConditionalGeneration`` checkpoint gets: transformers' own (``AutoProcessor``), or
with a Pixtral tower (Pixtral-12B, saved with ``PixtralProcessor``) the Pixtral shim, which needs no torchvision."""

from __future__ import annotations

from typing import Any

from vlm_lens.architectures.llava.config import PIXTRAL_TOWER
from vlm_lens.architectures.pixtral.processor import load_processor as load_pixtral_processor


def load_processor(name_or_path: str, **hf_kwargs: Any) -> Any:
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(name_or_path, **hf_kwargs)
    if getattr(config.vision_config, "model_type", None) == PIXTRAL_TOWER:
        return load_pixtral_processor(name_or_path, **hf_kwargs)
    return AutoProcessor.from_pretrained(name_or_path, **hf_kwargs)
