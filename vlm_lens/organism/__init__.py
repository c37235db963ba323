"""The model organisms: tiny LLaVA-1.5 models trained on synthetic shapes with known patch-level ground truth.

- ``"shapes"`` (the default, shipped): 48 px images on a 3 x 3 grid of 16 px patches, one to three
  objects, one object per patch, a 4-layer language model; four one-word question types.
- ``"scenes"``: 96 px images on an 8 x 8 grid of 12 px patches, one to five objects that span and straddle
  patches on a noisy, cluttered background, for an 8-layer language model; seven question types including
  counting, relative position and a two-word description. Shipped (8.5 MB); held-out accuracy 98.6-100 %
  on every type (see README.md here).

``available()`` lists the organisms whose weights ship:

>>> from vlm_lens import organism
>>> organism.available()
('shapes', 'scenes')
>>> item = organism.ShapesDataset(split="test", seed=0, size=10)[0]
>>> item.prompt.endswith("<image> ASSISTANT:")
True
>>> organism.ShapesDataset(split="test", seed=0, size=10, organism="scenes")[0].target_mask.shape
(8, 8)
"""

from __future__ import annotations

from pathlib import Path

from vlm_lens.organism.data import QUESTION_TYPES, ShapesDataset, generator, prompt_for
from vlm_lens.organism.drawing import ShapeObject, ShapesItem

__all__ = [
    "QUESTION_TYPES",
    "ShapeObject",
    "ShapesDataset",
    "ShapesItem",
    "available",
    "generator",
    "load",
    "path",
    "prompt_for",
]

_FOLDERS = {"shapes": "weights", "scenes": "weights_scenes"}


def available() -> tuple[str, ...]:
    """The names of the organisms whose weights ship with this install; the first (shapes) is ``load()``'s
    default, the last (the richest, scenes) the demo's. An organism whose weights are missing from an install
    (``ShapesDataset(..., organism=name)`` still works) is left out; ``load(name=...)`` says how to train it."""
    return tuple(name for name in _FOLDERS if (path(name) / "model.safetensors").exists())


def path(name: str = "shapes") -> Path:
    """The HF-format folder of the organism ``name`` (config, safetensors, tokenizer, processor)."""
    if name not in _FOLDERS:
        raise ValueError(f"unknown organism {name!r}; expected one of {tuple(_FOLDERS)}")
    return Path(__file__).resolve().parent / _FOLDERS[name]


def load(device: str = "cpu", *, name: str = "shapes", model_class=None):
    """The organism ``name`` as a HookedVLM (or as ``model_class``, a HookedVLM subclass such as
    ``vlm_lens.sae.HookedSAEVLM``)."""
    from vlm_lens import HookedVLM

    folder = path(name)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"the {name!r} organism's weights are not in {folder}: train them with `python -m "
            f"vlm_lens.organism.train --organism {name} --out {folder}` (see vlm_lens/organism/README.md)"
        )
    return (model_class or HookedVLM).from_pretrained(str(folder), device=device)
