"""vlm_lens: mechanistic interpretability for vision-language models, TransformerLens style.

``HookedVLM``, ``VLMInputs``, ``ImageLayout``, ``reuse_cache_memory`` (and the subpackages ``activations``,
``analysis``, ``viz``, ``organism``) are imported when first used: torch, transformers and TransformerLens take seconds
to import, and ``import vlm_lens`` alone (or ``vlm-lens --help``) should not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlm_lens._tl import compat  # noqa: F401  (must run before TransformerLens warns)

if TYPE_CHECKING:
    from vlm_lens.hooked_vlm import HookedVLM
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.layout import ImageLayout

__version__ = "0.1.0"
_EXPORTS = {"HookedVLM": "vlm_lens.hooked_vlm", "VLMInputs": "vlm_lens.inputs", "ImageLayout": "vlm_lens.layout",
            "reuse_cache_memory": "vlm_lens._memory"}
_SUBPACKAGES = ("activations", "analysis", "viz", "organism")
__all__ = ["HookedVLM", "ImageLayout", "VLMInputs", "reuse_cache_memory"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"vlm_lens.{name}")
    else:
        raise AttributeError(f"module 'vlm_lens' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
