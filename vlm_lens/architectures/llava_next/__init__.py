"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA's modules plus any-resolution tiling and the
learned ``image_newline``; a CLIP or SigLIP tower and a Llama-family language model.

- ``config``: ``AnyResConfig`` (LLaVA's settings plus the pinpoints; OneVision reuses it)
- ``convert``: LLaVA's weights plus ``image_newline``
- ``pipeline``: ``AnyResPipeline`` (geometry in ``vlm_lens.anyres``)
- ``testing``: tiny seeded checkpoints and a hypothesis strategy
"""

from vlm_lens.architectures.llava_next.config import llava_next_configs
from vlm_lens.architectures.llava_next.convert import convert_anyres
from vlm_lens.architectures.llava_next.pipeline import AnyResPipeline
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="LlavaNextForConditionalGeneration",
    build_configs=llava_next_configs,
    convert_weights=convert_anyres,
    pipeline=AnyResPipeline,
), family=__name__)
