"""Registry of architecture converters, keyed by the Hugging Face architecture (class) name.

Each architecture registers one ``ArchitectureSpec``: how to read its configs and how to turn an
in-memory HF model into a HookedVLM state dict. Adding a model family means adding a module that
calls ``register``; the core never tests architecture names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.config import VLMConfig

ConfigBuilder = Callable[[Any, torch.dtype, str], tuple[HookedTransformerConfig, VLMConfig]]
WeightConverter = Callable[[Any, HookedTransformerConfig, VLMConfig], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str  # HF architecture, e.g. "LlavaForConditionalGeneration"
    hf_class: Callable[[], type]  # lazily returns the transformers class
    build_configs: ConfigBuilder
    convert_weights: WeightConverter
    load_processor: Callable[..., Any] | None = None  # (name_or_path, **hf_kwargs); None: AutoProcessor


_REGISTRY: dict[str, ArchitectureSpec] = {}


def register(spec: ArchitectureSpec) -> ArchitectureSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"Architecture {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(architecture: str | None) -> ArchitectureSpec:
    if architecture not in _REGISTRY:
        raise ValueError(
            f"Unsupported architecture {architecture!r}. vlm_lens supports: "
            f"{', '.join(supported_architectures())}. Check the checkpoint's config.json "
            "'architectures' field."
        )
    return _REGISTRY[architecture]


def architecture_of(hf_config: Any) -> str | None:
    archs = getattr(hf_config, "architectures", None) or []
    return archs[0] if archs else None
