"""vlm_lens: mechanistic interpretability for vision-language models, TransformerLens style."""

from vlm_lens import _compat  # noqa: F401  (must run before TransformerLens warns)
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs
from vlm_lens.layout import ImageLayout

__all__ = ["HookedVLM", "ImageLayout", "VLMInputs"]
__version__ = "0.1.0"
