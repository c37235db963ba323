"""Converters from Hugging Face VLM checkpoints to HookedVLM state dicts, one module per family.

Importing this package registers every supported architecture.
"""

from vlm_lens.conversion import (
    llava,  # noqa: F401  (registers LlavaForConditionalGeneration)
    llava_next,  # noqa: F401  (registers LlavaNextForConditionalGeneration)
    llava_onevision,  # noqa: F401  (registers LlavaOnevisionForConditionalGeneration)
    qwen2_5_vl,  # noqa: F401  (registers Qwen2_5_VLForConditionalGeneration)
)
from vlm_lens.conversion.registry import (
    ArchitectureSpec,
    architecture_of,
    get_spec,
    register,
    supported_architectures,
)

__all__ = ["ArchitectureSpec", "architecture_of", "get_spec", "register", "supported_architectures"]
