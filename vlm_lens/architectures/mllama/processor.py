"""transformers' ``MllamaProcessor`` taking a batch's images flat, in prompt order.

``vlm_lens.inputs.prepare_inputs`` hands the processor one flat list of images; Mllama's processor wants one
list per prompt. The shim groups the flat list by each prompt's ``<|image|>`` count; everything else is
transformers' own.
"""

from __future__ import annotations

from typing import Any

from transformers import MllamaProcessor


class MllamaFlatImagesProcessor(MllamaProcessor):
    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> Any:
        if isinstance(text, (list, tuple)) and isinstance(images, (list, tuple)) \
                and not any(isinstance(x, (list, tuple)) for x in images):
            counts = [t.count(self.image_token) for t in text]
            if sum(counts) != len(images):
                raise ValueError(f"The prompts hold {sum(counts)} {self.image_token} tokens ({counts} per prompt) but "
                                 f"{len(images)} images were given; give one image per {self.image_token}.")
            starts = [sum(counts[:i]) for i in range(len(counts))]
            images = [list(images[s:s + n]) for s, n in zip(starts, counts)]
        return super().__call__(images=images, text=text, **kwargs)


def load_processor(name_or_path: str, **hf_kwargs: Any) -> MllamaFlatImagesProcessor:
    return MllamaFlatImagesProcessor.from_pretrained(name_or_path, **hf_kwargs)
