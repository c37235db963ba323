"""Qwen3-VL's processor for images only (no video processor, which needs torchvision)."""

from __future__ import annotations

import re
from typing import Any, no_type_check

import torch
from transformers import Qwen3VLProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array


class Qwen3VLImageProcessor(Qwen3VLProcessor):
    """transformers' ``Qwen3VLProcessor`` for images only, as ``model.prepare`` needs it.

    The same three changes as ``Qwen2_5_VLImageProcessor``: no video processor (transformers builds those on
    torchvision, which vlm_lens never installs); a bare ``<|image_pad|>`` is wrapped in
    ``<|vision_start|>``/``<|vision_end|>`` as the chat template writes every image; the output has
    ``image_sizes`` (each image's original (height, width), for ``layout.boxes``). Tokenizer, image processor,
    chat template and token counting are transformers' own.

    Example:
        >>> from vlm_lens.architectures.qwen3_vl.testing import image, make_processor
        >>> processor = make_processor()  # or from_pretrained(folder)
        >>> out = processor(text=["<|image_pad|> describe"], images=[image((20, 30))], return_tensors="pt")
        >>> processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])[:2], out["image_sizes"].tolist()
        (['<|vision_start|>', '<|image_pad|>'], [[20, 30]])
    """

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @no_type_check
    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any):
        if videos is not None:
            raise ValueError("vlm_lens feeds Qwen3-VL still images only; videos are not supported. Pass frames "
                             "as separate images if you need them.")
        if text is not None:
            start = re.escape(self.vision_start_token)
            bare = re.compile(rf"(?<!{start}){re.escape(self.image_token)}")
            wrapped = f"{self.vision_start_token}{self.image_token}{self.vision_end_token}"
            text = [bare.sub(wrapped, t) for t in ([text] if isinstance(text, str) else text)]
        out = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["image_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out


def load_processor(name_or_path: str, **hf_kwargs: Any) -> Qwen3VLImageProcessor:
    return Qwen3VLImageProcessor.from_pretrained(name_or_path, **hf_kwargs)
