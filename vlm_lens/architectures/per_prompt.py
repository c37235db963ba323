"""A processor mix-in for families whose processor reads how images are grouped per prompt.

``model.prepare`` hands a processor one flat list of images. Some processors decide how to encode an image
from the prompt it belongs to (LLaVA-OneVision: a prompt with several images gets one tile per image, a
single image is tiled at any resolution; SmolVLM wants one list per prompt), so the flat list is regrouped
here by counting each prompt's image placeholders before the processor sees it.
"""

from __future__ import annotations

from itertools import accumulate
from typing import no_type_check

from transformers.image_utils import is_valid_image


class ImagesPerPrompt:
    """Mixed in before a transformers processor: flat images become one list per prompt."""

    @no_type_check
    def prepare_inputs_layout(self, images=None, text=None, **kwargs):
        if images is not None and text is not None and isinstance(images, (list, tuple)) and images \
                and all(is_valid_image(img) for img in images):
            texts = [text] if isinstance(text, str) else list(text)
            counts = [t.count(self.image_token) for t in texts]
            if sum(counts) == len(images):  # otherwise the processor's own check names the mismatch
                ends = list(accumulate(counts))
                images = [list(images[end - n:end]) for n, end in zip(counts, ends)]
        return super().prepare_inputs_layout(images=images, text=text, **kwargs)
