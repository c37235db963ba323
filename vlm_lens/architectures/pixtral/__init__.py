"""Mistral 3 (``Mistral3ForConditionalGeneration``): the Pixtral vision encoder (any image size, 2-D rotary,
attention within each image), a projector with RMSNorm and a 2x2 patch merger, and a Mistral language model;
``[IMG_BREAK]`` closes each row of image tokens and ``[IMG_END]`` the image.

``LlavaForConditionalGeneration`` checkpoints with a Pixtral tower (Pixtral-12B) belong to the ``llava``
family, which owns that class name: it reuses this tower, its converter, ``PixtralPipeline`` and the processor
shim, with no patch merger and LLaVA's projector.

- ``config``: ``PixtralVisionConfig``, ``PixtralVLMConfig`` (what the tower and pipeline read),
  ``Mistral3Config`` and reading them
- ``convert``: weights (LM through TransformerLens's Mistral converter; tower and projector here)
- ``vision``, ``projector``: the hooked tower and Mistral 3's projector with the patch merger
- ``pipeline``: ``PixtralPipeline`` (pixels, tower, the layout with breaks and end tokens) and ``Mistral3Pipeline``
- ``processor``: ``PixtralImagesProcessor``, the processor shim (transformers' needs torchvision)
- ``testing``: tiny seeded checkpoints saved as on the hub
"""

from vlm_lens.architectures.pixtral.config import mistral3_configs
from vlm_lens.architectures.pixtral.convert import convert_mistral3
from vlm_lens.architectures.pixtral.pipeline import Mistral3Pipeline
from vlm_lens.architectures.pixtral.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="Mistral3ForConditionalGeneration",
    build_configs=mistral3_configs,
    convert_weights=convert_mistral3,
    pipeline=Mistral3Pipeline,
    load_processor=load_processor,
), family=__name__)
