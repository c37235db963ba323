"""Qwen2.5-VL's processor for images only (no video processor, which needs torchvision).

``ImagesOnlyQwenProcessor`` is the shim itself, a mixin Qwen2-VL's processor shim shares."""

from __future__ import annotations

import re
from typing import Any, no_type_check

import torch
from transformers import Qwen2_5_VLProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array


class ImagesOnlyQwenProcessor:
    """Mixin in front of transformers' ``Qwen2_5_VLProcessor`` or ``Qwen2VLProcessor``, for images only, as
    ``model.prepare`` needs it.

    - No video processor: transformers builds those on torchvision, which vlm_lens never installs (see
      ``LlavaOnevisionImageProcessor``); tokenizer, image processor and token counting are unchanged.
    - A bare ``<|image_pad|>`` (e.g. the one ``model.prepare`` puts before a prompt without placeholder) is
      wrapped in ``<|vision_start|>``/``<|vision_end|>``, as Qwen's chat template writes every image.
    - The output also has ``image_sizes``: each image's original (height, width), for ``layout.boxes``.
    """

    image_token: str

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    @no_type_check
    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any):
        if videos is not None:
            raise ValueError("vlm_lens feeds Qwen-VL models still images only; videos are not supported. Pass "
                             "frames as images=[...] if a few stills will do.")
        if text is not None:
            bare = re.compile(rf"(?<!{re.escape('<|vision_start|>')}){re.escape(self.image_token)}")
            wrapped = f"<|vision_start|>{self.image_token}<|vision_end|>"
            text = [bare.sub(wrapped, t) for t in ([text] if isinstance(text, str) else text)]
        out = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["image_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out


class Qwen2_5_VLImageProcessor(ImagesOnlyQwenProcessor, Qwen2_5_VLProcessor):
    """transformers' ``Qwen2_5_VLProcessor`` for images only (see ``ImagesOnlyQwenProcessor``).

    Example:
        >>> from vlm_lens.architectures.qwen2_5_vl.testing import image, make_processor
        >>> processor = make_processor()  # or from_pretrained(folder)
        >>> out = processor(text=["<|image_pad|> describe"], images=[image((20, 30))], return_tensors="pt")
        >>> processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])[:2], out["image_sizes"].tolist()
        (['<|vision_start|>', '<|image_pad|>'], [[20, 30]])
    """


def load_processor(name_or_path: str, **hf_kwargs: Any) -> Qwen2_5_VLImageProcessor:
    return Qwen2_5_VLImageProcessor.from_pretrained(name_or_path, **hf_kwargs)
