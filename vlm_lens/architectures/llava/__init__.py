"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP or SigLIP tower, a two-layer projector and a
Llama-family language model (Llama, Mistral, Qwen2). The same class with a Pixtral tower (Pixtral-12B) reuses
``vlm_lens.architectures.pixtral``'s tower, pipeline, layout and processor shim, with no patch merger.

- ``config``: ``LlavaConfig`` and reading it from the HF config (shared by the LLaVA line), ``LlavaPixtralConfig``
- ``convert``: weights (tower, projector, language model)
- ``pipeline``: ``LlavaPipeline`` (one tile per image, one square grid), ``LlavaPixtralPipeline``, and
  ``llava_pipeline``, which picks one by config
- ``processor``: transformers' processor, or the Pixtral shim for a Pixtral tower
- ``testing``: tiny seeded checkpoints and a hypothesis strategy, for the tests
"""

from vlm_lens.architectures.llava.config import llava_configs
from vlm_lens.architectures.llava.convert import convert_llava
from vlm_lens.architectures.llava.pipeline import llava_pipeline
from vlm_lens.architectures.llava.processor import load_processor
from vlm_lens.architectures.registry import ArchitectureSpec, register

SPEC = register(ArchitectureSpec(
    name="LlavaForConditionalGeneration",
    build_configs=llava_configs,
    convert_weights=convert_llava,
    pipeline=llava_pipeline,
    load_processor=load_processor,
), family=__name__)
