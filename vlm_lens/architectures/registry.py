"""Registry of architectures, keyed by the Hugging Face architecture (class) name.

Each family (a folder under ``vlm_lens/architectures/``) registers one ``ArchitectureSpec`` in its
``__init__``: how to read its configs, turn an in-memory HF model into a HookedVLM state dict, load its
processor, and build its image pipeline. Families are found by listing the folder, so adding one is a new
folder; the core never tests architecture names. Looking up a checkpoint's architecture first imports the
family folder named like its config's ``model_type``, if there is one, and every family only when that
does not register it (importing all of them, and the transformers model modules they use, takes longer
than Hugging Face's whole loading of a small model).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformer_lens.config import HookedTransformerConfig

from vlm_lens.config import VLMConfig

if TYPE_CHECKING:
    from vlm_lens.pipeline import ImagePipeline

ConfigBuilder = Callable[[Any, torch.dtype, str], tuple[HookedTransformerConfig, VLMConfig]]
WeightConverter = Callable[[Any, HookedTransformerConfig, VLMConfig], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str  # HF architecture, e.g. "LlavaForConditionalGeneration"
    build_configs: ConfigBuilder
    convert_weights: WeightConverter
    # a new pipeline object per model, given the model's config: a pipeline class, or a function that picks one by
    # config where one class name covers checkpoints with different image paths (LLaVA with a Pixtral tower)
    pipeline: Callable[[VLMConfig], ImagePipeline]
    hf_class: Callable[[], type] | None = None  # lazily returns the HF class; None: ``transformers.<name>``
    load_processor: Callable[..., Any] | None = None  # (name_or_path, **hf_kwargs); None: AutoProcessor
    family: str = ""  # the package under vlm_lens.architectures that registered it (set by register)


_REGISTRY: dict[str, ArchitectureSpec] = {}
_DISCOVERED = False


def register(spec: ArchitectureSpec, family: str | None = None) -> ArchitectureSpec:
    """Register ``spec``; ``family`` is the registering package's ``__name__``. A name registered twice raises."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Architecture {spec.name!r} is already registered (by {_REGISTRY[spec.name].family}).")
    if spec.hf_class is None:
        spec = replace(spec, hf_class=transformers_class(spec.name))
    if family is not None:
        spec = replace(spec, family=family.rsplit(".", 1)[-1])
    _REGISTRY[spec.name] = spec
    return spec


def transformers_class(name: str) -> Callable[[], type]:
    """A getter of ``transformers.<name>``, called only when a checkpoint is loaded (transformers imports its
    model classes on first access)."""
    def get() -> type:
        import transformers

        return getattr(transformers, name)

    return get


def _discover() -> None:
    """Import every family package under ``vlm_lens.architectures`` (each registers itself)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import vlm_lens.architectures as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def supported_architectures() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def all_specs() -> list[ArchitectureSpec]:
    _discover()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_spec(architecture: str | None, model_type: str | None = None) -> ArchitectureSpec:
    """The spec registered for ``architecture``; ``model_type`` (the HF config's) names the family folder to
    try first."""
    if architecture not in _REGISTRY and model_type and model_type.isidentifier():
        name = f"{__package__}.{model_type}"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    if architecture not in _REGISTRY:
        _discover()
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
