"""InternVL's processor for images only, as ``model.prepare`` needs it.

transformers' ``InternVLProcessor`` cannot be built here: it loads a video processor, which needs torchvision
(vlm_lens never installs it). ``InternVLImagesOnlyProcessor`` keeps the checkpoint's image processor (the PIL
``GotOcr2ImageProcessorPil`` when torchvision is missing), tokenizer, chat template and the processor's own
prompt expansion (``<img>`` + ``<IMG_CONTEXT>`` * image_seq_length * tiles + ``</img>``), and

- adds ``tile_grid`` [n_images, 2]: each image's (rows, cols) of crops, (0, 0) when the image is one tile
  (``crop_to_patches`` off, or a 1x1 canvas, which gets no thumbnail); the image processor computes the
  canvas but does not return it;
- adds ``image_sizes`` [n_images, 2]: each image's original (height, width), for ``layout.boxes``;
- refuses videos with a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, no_type_check

from transformers import InternVLProcessor
from transformers.image_utils import get_image_size, make_flat_list_of_images, to_numpy_array
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas


def _setting(kwargs: dict[str, Any], image_processor: Any, name: str) -> Any:
    value = kwargs.get(name)
    return getattr(image_processor, name) if value is None else value


def tile_grid(size: Sequence[int], tile: Sequence[int], crop: bool, min_patches: int, max_patches: int) -> list[int]:
    """(rows, cols) of crops the image processor cuts an image of ``size`` (height, width) into; (0, 0): one tile."""
    if not crop or max_patches <= 1:
        return [0, 0]
    cols, rows = get_optimal_tiled_canvas(tuple(size), tuple(tile), int(min_patches), int(max_patches))
    return [0, 0] if rows * cols == 1 else [rows, cols]


class InternVLImagesOnlyProcessor(InternVLProcessor):
    """transformers' ``InternVLProcessor`` without its video processor, plus ``tile_grid`` and ``image_sizes``.

    Example:
        >>> from vlm_lens.architectures.internvl import testing
        >>> processor = testing.make_processor()  # or from_pretrained(folder)
        >>> out = processor(text=testing.PROMPTS, images=[testing.image((12, 30)), testing.image((10, 12))],
        ...                 return_tensors="pt", padding=True)
        >>> tuple(out["pixel_values"].shape), out["tile_grid"].tolist()  # 1x2 crops + thumbnail, one tile
        ((4, 3, 16, 16), [[1, 2], [0, 0]])
    """

    # transformers routes saved settings by ``__init__.__code__.co_varnames``: no type-check wrapper here.
    @no_type_check
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    @no_type_check
    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("vlm_lens feeds InternVL still images only; videos are not supported. Pass frames as "
                             "images=[...] if a few stills will do.")
        return super().__call__(images=images, text=text, **kwargs)

    @no_type_check
    def _process_images(self, images, **kwargs):
        processed, replacements = super()._process_images(images, **kwargs)
        ip = self.image_processor
        size = _setting(kwargs, ip, "size")
        tile = (size["height"], size["width"])
        crop, low, high = (_setting(kwargs, ip, k) for k in ("crop_to_patches", "min_patches", "max_patches"))
        sizes = [list(get_image_size(to_numpy_array(img))) for img in make_flat_list_of_images(images)]
        grids = [tile_grid(s, tile, bool(crop), int(low), int(high)) for s in sizes]
        counts = [r * c + 1 if r else 1 for r, c in grids]
        if counts != [int(n) for n in processed["num_patches"]]:
            raise ValueError(f"The image processor cut the images into {list(processed['num_patches'])} tiles, but "
                             f"vlm_lens's reading of its settings gives {counts}; this image processor is not supported.")
        processed["tile_grid"], processed["image_sizes"] = grids, sizes
        return processed, replacements


def load_processor(name_or_path: str, **hf_kwargs: Any) -> InternVLImagesOnlyProcessor:
    return InternVLImagesOnlyProcessor.from_pretrained(name_or_path, **hf_kwargs)
