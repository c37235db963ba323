"""PaliGemma's processor as ``model.prepare`` calls it. transformers' ``PaliGemmaProcessor`` builds without
torchvision (SigLIP's PIL image processor); the shim only adds what vlm_lens reads."""

from __future__ import annotations

from typing import Any, no_type_check

import torch
from transformers import PaliGemmaProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array


class PaliGemmaFlatProcessor(PaliGemmaProcessor):
    """transformers' ``PaliGemmaProcessor`` (tokenizer, image processor, ``<bos>`` after the images, ``\\n`` after
    the prefix, ``suffix=`` with its ``<eos>`` and ``token_type_ids``, all unchanged), plus:

    - the output also has ``image_sizes``: each image's original (height, width), for ``layout.boxes``;
    - ``image_placeholder_separator = ""``: ``model.prepare`` puts the images of a prompt without placeholders
      straight before it (``<image>...<bos>prompt\\n``, PaliGemma's format), not on a line of their own.

    Example:
        >>> from vlm_lens.architectures.paligemma.testing import image, make_processor
        >>> processor = make_processor()  # or PaliGemmaFlatProcessor.from_pretrained(folder)
        >>> out = processor(text=["<image> what is this ?"], images=[image((20, 30))], suffix=["a cat"],
        ...                 return_tensors="pt")
        >>> out["token_type_ids"][0, -4:].tolist(), out["image_sizes"].tolist()  # "\\n" ends the prefix
        ([0, 1, 1, 1], [[20, 30]])
    """

    image_placeholder_separator = ""

    @no_type_check
    def __call__(self, images: Any = None, text: Any = None, suffix: Any = None, **kwargs: Any):
        if kwargs.get("videos") is not None:
            raise ValueError("PaliGemma takes images only; videos are not supported.")
        out = super().__call__(images=images, text=text, suffix=suffix, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["image_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out


def load_processor(name_or_path: str, **hf_kwargs: Any) -> PaliGemmaFlatProcessor:
    return PaliGemmaFlatProcessor.from_pretrained(name_or_path, **hf_kwargs)
