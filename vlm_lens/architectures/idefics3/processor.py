"""Images-only processors for Idefics3 and SmolVLM, as ``model.prepare`` needs them.

transformers' ``SmolVLMProcessor`` cannot be built here: it loads a video processor (which needs
torchvision) and refuses to start without ``num2words`` (used only to write video prompts). Both shims keep
the checkpoint's image processor, tokenizer, chat template and the processor's own prompt expansion, and

- take images as one flat list (what ``model.prepare`` passes) and regroup them per prompt by counting each
  prompt's ``<image>`` placeholders (both processors want one list per prompt; Idefics3's does this
  itself, SmolVLM's does not);
- add ``tile_grid`` [n_images, 2] (each image's crop rows and cols, (0, 0) when not split: the image
  processor computes them, the stock processors drop them) and ``image_sizes`` [n_images, 2] (original
  height, width), which the layout needs;
- refuse videos with a ``ValueError``.
"""

from __future__ import annotations

from typing import Any, no_type_check

from transformers import Idefics3Processor, SmolVLMProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array
from transformers.processing_utils import ProcessorMixin

from vlm_lens.architectures.per_prompt import ImagesPerPrompt


class _ImagesOnly(ImagesPerPrompt):
    """What both shims add to their transformers processor (mixed in before it)."""

    @no_type_check
    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(f"vlm_lens feeds {type(self).__name__} still images only; videos are not supported.")
        return super().__call__(images=images, text=text, **kwargs)

    @no_type_check
    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        processed["tile_grid"] = [[r, c] for rows, cols in zip(processed["rows"], processed["cols"])
                                  for r, c in zip(rows, cols)]
        processed["image_sizes"] = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
        return processed, replacements


class Idefics3ImagesOnlyProcessor(_ImagesOnly, Idefics3Processor):
    """transformers' ``Idefics3Processor`` plus ``tile_grid`` and ``image_sizes`` (see the module docstring).

    Example:
        >>> from vlm_lens.architectures.idefics3 import testing
        >>> processor = testing.make_processor()  # or from_pretrained(folder)
        >>> out = processor(text=testing.PROMPTS, images=[testing.image((16, 32)), testing.image((32, 32))],
        ...                 return_tensors="pt", padding=True)
        >>> tuple(out["pixel_values"].shape), out["tile_grid"].tolist()  # 1x2 crops + global, 2x2 + global
        ((2, 5, 3, 16, 16), [[1, 2], [2, 2]])
    """


class SmolVLMImagesOnlyProcessor(_ImagesOnly, SmolVLMProcessor):
    """transformers' ``SmolVLMProcessor`` without its video processor and ``num2words`` (see the module docstring)."""

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor.__init__ without the video processor and the num2words check
        self.fake_image_token = getattr(tokenizer, "fake_image_token", "<fake_token_around_image>")
        self.image_token = getattr(tokenizer, "image_token", "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", "<end_of_utterance>")
        self.global_image_token = getattr(tokenizer, "global_image_token", "<global-img>")
        self.image_seq_len = image_seq_len
        self.video_token = getattr(tokenizer, "video_token", "<video>")
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @no_type_check
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """The checkpoint's chat template, without SmolVLM's video defaults (which read the video processor)."""
        return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)


def load_idefics3_processor(name_or_path: str, **hf_kwargs: Any) -> Idefics3ImagesOnlyProcessor:
    return Idefics3ImagesOnlyProcessor.from_pretrained(name_or_path, **hf_kwargs)


def load_smolvlm_processor(name_or_path: str, **hf_kwargs: Any) -> SmolVLMImagesOnlyProcessor:
    return SmolVLMImagesOnlyProcessor.from_pretrained(name_or_path, **hf_kwargs)
