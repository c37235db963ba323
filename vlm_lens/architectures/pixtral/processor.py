"""Pixtral's processor without torchvision: ``PixtralImagesProcessor``.

transformers' ``PixtralProcessor`` is an empty placeholder when torchvision is missing (its module imports the
torchvision image processor for one helper), so checkpoints saved with ``"processor_class": "PixtralProcessor"``
(Mistral 3, Pixtral) could not be prepared here. This shim is the same processor on ``ProcessorMixin``: the
checkpoint's image processor (transformers falls back to ``PixtralImageProcessorPil``), tokenizer and chat
template, and the same prompt expansion: each ``[IMG]`` becomes, per row of merged patches,
``[IMG]`` * cols + ``[IMG_BREAK]``, the last ``[IMG_BREAK]`` replaced by ``[IMG_END]``.

The output also has ``original_sizes``: each image's (height, width) before resizing, for ``layout.boxes``
(``image_sizes`` is the resized size the model reads, as in transformers).
"""

from __future__ import annotations

from typing import Any, no_type_check

import torch
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array
from transformers.processing_utils import ProcessorMixin


class PixtralImagesProcessor(ProcessorMixin):
    """transformers' ``PixtralProcessor``, buildable without torchvision (see the module docstring).

    Example:
        >>> from vlm_lens.architectures.pixtral.testing import image, make_processor
        >>> processor = make_processor()  # or PixtralImagesProcessor.from_pretrained(folder)
        >>> out = processor(text=["[IMG] describe"], images=[image((16, 24))], return_tensors="pt")
        >>> processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])[1:9]
        ['[IMG]', '[IMG]', '[IMG]', '[IMG_BREAK]', '[IMG]', '[IMG]', '[IMG]', '[IMG_END]']
        >>> out["image_sizes"].tolist(), out["original_sizes"].tolist()
        ([[16, 24]], [[16, 24]])
    """

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template=None, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                 image_end_token="[IMG_END]", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.image_token, self.image_break_token, self.image_end_token = image_token, image_break_token, image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    @no_type_check
    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("Pixtral / Mistral 3 take images only; videos are not supported.")
        out = super().__call__(images=images, text=text, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["original_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out

    @no_type_check
    def _process_images(self, images, **images_kwargs):
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size  # sizes: multiples of a token
        return super()._process_images(images, **images_kwargs)

    @no_type_check
    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        step = self.patch_size * self.spatial_merge_size
        height, width = (int(v) for v in image_inputs["image_sizes"][image_idx])
        rows = [self.image_token * (width // step) + self.image_break_token] * (height // step)
        text = "".join(rows)
        return text[:-len(self.image_break_token)] + self.image_end_token

    @property
    def model_input_names(self) -> list[str]:
        return self.tokenizer.model_input_names + self.image_processor.model_input_names + ["image_sizes"]


def load_processor(name_or_path: str, **hf_kwargs: Any) -> PixtralImagesProcessor:
    return PixtralImagesProcessor.from_pretrained(name_or_path, **hf_kwargs)
