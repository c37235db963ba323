"""Qwen2-VL's processor for images only: ``AutoProcessor`` cannot build the stock one without torchvision
(its video processor needs it), so checkpoints load through this shim."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2VLProcessor

from vlm_lens.architectures.qwen2_5_vl.processor import ImagesOnlyQwenProcessor


class Qwen2VLImageProcessor(ImagesOnlyQwenProcessor, Qwen2VLProcessor):
    """transformers' ``Qwen2VLProcessor`` without its video processor; a bare ``<|image_pad|>`` is wrapped in the
    vision markers and the output has ``image_sizes`` (see ``ImagesOnlyQwenProcessor``).

    Example:
        >>> from vlm_lens.architectures.qwen2_vl.testing import image, make_processor
        >>> processor = make_processor()  # or Qwen2VLImageProcessor.from_pretrained(folder)
        >>> out = processor(text=["<|image_pad|> describe"], images=[image((16, 24))], return_tensors="pt")
        >>> out["image_grid_thw"].tolist(), int((out["input_ids"] == processor.image_token_id).sum())
        ([[1, 4, 6]], 6)
    """


def load_processor(name_or_path: str, **hf_kwargs: Any) -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor.from_pretrained(name_or_path, **hf_kwargs)
