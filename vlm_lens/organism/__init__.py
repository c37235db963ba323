"""The model organism: a tiny LLaVA-1.5 trained on synthetic shapes with known patch-level ground truth.

>>> from vlm_lens import organism
>>> item = organism.ShapesDataset(split="test", seed=0, size=10)[0]
>>> item.prompt.endswith("<image> ASSISTANT:")
True
"""

from __future__ import annotations

from pathlib import Path

from vlm_lens.organism.data import QUESTION_TYPES, ShapeObject, ShapesDataset, ShapesItem, prompt_for

__all__ = ["QUESTION_TYPES", "ShapeObject", "ShapesDataset", "ShapesItem", "load", "path", "prompt_for"]


def path() -> Path:
    """The HF-format folder of the shipped organism (config, safetensors, tokenizer, processor)."""
    return Path(__file__).resolve().parent / "weights"


def load(device: str = "cpu", *, model_class=None):
    """The shipped organism as a HookedVLM (or as ``model_class``, a HookedVLM subclass such as
    ``vlm_lens.sae.HookedSAEVLM``)."""
    from vlm_lens import HookedVLM

    return (model_class or HookedVLM).from_pretrained(str(path()), device=device)
