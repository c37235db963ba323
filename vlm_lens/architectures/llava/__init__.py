"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP or SigLIP tower, a two-layer projector and a
Llama-family language model (Llama, Mistral, Qwen2).

- ``config``: ``LlavaConfig`` and reading it from the HF config (shared by the LLaVA line)
- ``convert``: weights (tower, projector, language model)
- ``pipeline``: ``LlavaPipeline`` (one tile per image, one square grid)
- ``testing``: tiny seeded checkpoints and a hypothesis strategy, for the tests
"""

from vlm_lens.architectures.llava.config import llava_configs
from vlm_lens.architectures.llava.convert import convert_llava
from vlm_lens.architectures.llava.pipeline import LlavaPipeline
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="LlavaForConditionalGeneration",
    build_configs=llava_configs,
    convert_weights=convert_llava,
    pipeline=LlavaPipeline,
), family=__name__)
