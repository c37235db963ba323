"""LLaVA-OneVision's processor without its video processor (which needs torchvision)."""

from __future__ import annotations

from typing import Any, no_type_check

from transformers import LlavaOnevisionProcessor

from vlm_lens.architectures.per_prompt import ImagesPerPrompt


class LlavaOnevisionImageProcessor(ImagesPerPrompt, LlavaOnevisionProcessor):
    """transformers' ``LlavaOnevisionProcessor`` without its video processor.

    transformers builds every video processor on torchvision, and ``AutoProcessor`` loads the video
    processor eagerly (transformers issue #48558), so without torchvision the OneVision processor cannot
    be built at all. vlm_lens feeds images only; this keeps the image processor, tokenizer and the
    processor's own token counting unchanged, and regroups ``model.prepare``'s flat image list per prompt
    (the processor tiles a prompt's single image, and gives each image of a multi-image prompt one tile).

    Example:
        >>> from vlm_lens.architectures.llava_next import testing
        >>> processor = testing.make_processor(testing.tiny_onevision_config())  # or from_pretrained(folder)
        >>> out = processor(text=testing.PROMPT, images=[testing.seeded_image((20, 20))], return_tensors="pt")
        >>> tuple(out["pixel_values"].shape), int((out["input_ids"] == processor.image_token_id).sum())
        ((1, 5, 3, 16, 16), 46)
    """

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor: Any = None, tokenizer: Any = None, num_image_tokens: int | None = None,
                 vision_feature_select_strategy: str | None = None, chat_template: str | None = None,
                 image_token: str = "<image>", video_token: str = "<video>",
                 vision_aspect_ratio: str = "anyres_max_9", **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy,
                         chat_template=chat_template, image_token=image_token, video_token=video_token,
                         vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def load_onevision_processor(name_or_path: str, **hf_kwargs: Any) -> LlavaOnevisionImageProcessor:
    return LlavaOnevisionImageProcessor.from_pretrained(name_or_path, **hf_kwargs)
