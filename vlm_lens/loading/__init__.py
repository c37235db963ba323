"""Loading checkpoints into a ``HookedVLM``: finding and reading safetensors (``checkpoint``), strict
conversion with about one copy of the weights in memory (``load``), which language-model weights are
processed together (``weights``). Weight processing runs through TransformerLens's own code, one group at
a time (``vlm_lens._tl.processing``). The names below load on first use, so importing a submodule does not
import the loader."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_from_hf", "load_pretrained", "resolve_dtype"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("vlm_lens.loading.load"), name)
    raise AttributeError(f"module 'vlm_lens.loading' has no attribute {name!r}")
