"""Gemma 3's processor as ``model.prepare`` calls it: images as one flat list, pan-and-scan refused."""

from __future__ import annotations

from typing import Any, no_type_check

import torch
from transformers import Gemma3Processor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array


class Gemma3FlatProcessor(Gemma3Processor):
    """transformers' ``Gemma3Processor`` (tokenizer, image processor and token expansion unchanged), plus:

    - ``images`` may be one flat list for a batch of prompts (``model.prepare`` passes that): it is regrouped
      per prompt by the prompts' ``<start_of_image>`` counts, since ``Gemma3Processor`` wants a list per prompt.
    - Pan-and-scan (``do_pan_and_scan=True``, in the call or the saved image processor) raises a ValueError:
      its crops would be laid out as separate images; vlm_lens feeds one tile per image.
    - Prompts that already begin with the BOS token (Gemma's chat template writes it) get no second one, as
      transformers' ``apply_chat_template(tokenize=True)`` does.
    - The output also has ``image_sizes``: each image's original (height, width), for ``layout.boxes``.

    Example:
        >>> from vlm_lens.architectures.gemma3.testing import image, make_processor
        >>> processor = make_processor()  # or Gemma3FlatProcessor.from_pretrained(folder)
        >>> texts = ["<start_of_image> what is this ?", "describe <start_of_image>"]
        >>> out = processor(text=texts, images=[image((20, 30)), image((40, 24))], return_tensors="pt", padding=True)
        >>> (out["input_ids"] == processor.tokenizer.image_token_id).sum(1).tolist(), out["image_sizes"].tolist()
        ([9, 9], [[20, 30], [40, 24]])
    """

    @no_type_check
    def __call__(self, images: Any = None, text: Any = None, videos: Any = None, **kwargs: Any):
        if videos is not None:
            raise ValueError("Gemma 3 takes images only; videos are not supported.")
        if kwargs.get("do_pan_and_scan", getattr(self.image_processor, "do_pan_and_scan", None)):
            raise ValueError("vlm_lens does not support Gemma 3's pan-and-scan (its crops would be laid out as separate "
                             "images). Pass do_pan_and_scan=False, or set processor.image_processor.do_pan_and_scan = False.")
        texts = None if text is None else [text] if isinstance(text, str) else list(text)
        if images is not None and texts is not None:
            images = self._per_prompt(images, texts)
        bos = self.tokenizer.bos_token
        if texts and bos and all(t.startswith(bos) for t in texts):
            kwargs.setdefault("add_special_tokens", False)
        out = super().__call__(images=images, text=texts, **kwargs)
        if images is not None:
            sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
            out["image_sizes"] = torch.tensor(sizes) if kwargs.get("return_tensors") == "pt" else sizes
        return out

    def _per_prompt(self, images: Any, texts: list[str]) -> list[list[Any]]:
        images = [images] if not isinstance(images, (list, tuple)) else list(images)
        if all(isinstance(x, (list, tuple)) for x in images):
            return [list(x) for x in images]
        counts = [t.count(self.image_token) for t in texts]
        if sum(counts) != len(images):
            raise ValueError(f"The prompts have {counts} {self.image_token!r} placeholders ({sum(counts)} in all) but "
                             f"{len(images)} images were given; give one image per placeholder.")
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [images[s:s + c] for s, c in zip(starts, counts)]


def load_processor(name_or_path: str, **hf_kwargs: Any) -> Gemma3FlatProcessor:
    return Gemma3FlatProcessor.from_pretrained(name_or_path, **hf_kwargs)
