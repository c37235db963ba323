"""Synthetic shapes data whose ground truth is known pixel by pixel and patch by patch.

Each image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels on a dark background, split into a 3 x 3 grid of
``CELL`` pixel cells. One to three objects, with distinct shapes and distinct colours, sit in distinct
cells. The vision tower cuts the image into ``PATCH`` pixel patches (a ``GRID`` x ``GRID`` grid, 16 px
patches as in CLIP ViT-B/16); a cell is exactly one patch, so each object lies in a single patch and the
masks are general (they would hold for any ``PATCH`` that divides ``IMAGE_SIZE``).

Patch-mask rule: ``patch_mask[r, c]`` is True iff the ``PATCH`` x ``PATCH`` block of pixels
``[r*PATCH:(r+1)*PATCH, c*PATCH:(c+1)*PATCH]`` contains at least one pixel of the object.

Every item is a function of ``(split, seed, index)`` only. Train and test never share an image: a
scene's parameters (which fully determine its pixels) are hashed into a split, and each split only
keeps the scenes that hash to it.

>>> from vlm_lens.organism import ShapesDataset
>>> item = ShapesDataset(split="test", seed=0, size=4)[0]
>>> item.image.size, item.answer in ANSWERS
((48, 48), True)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
from PIL import Image

from vlm_lens.organism import scenes
from vlm_lens.organism.drawing import (
    COLOURS,
    POSITIONS,  # noqa: F401  (re-exported: the 3 x 3 layout names)
    SPLITS,
    ShapeObject,
    ShapesItem,
    draw_objects,
    exists_question,
    position_name,
    prompt_for,
    split_of,
)

NAME = "shapes"
IMAGE_SIZE = 48
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # patches per side (3)
CELL = 16
CELLS = IMAGE_SIZE // CELL  # cells per side (3)
BACKGROUND = (24, 24, 24)

SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("colour_of_shape", "shape_of_colour", "exists", "position")
QuestionType = Literal["colour_of_shape", "shape_of_colour", "exists", "position"]
ANSWERS = (*SHAPES, *COLOURS, "yes", "no")
MAX_OBJECTS = 3
# Words of the questions and answers (the tokenizer's vocabulary is these plus the chat words).
WORDS = ("what", "colour", "shape", "is", "the", "object", "at", "there", "a", *ANSWERS,
         "top", "middle", "bottom", "left", "right", "centre")  # fmt: skip
TEST_FRACTION = 0.2  # share of scene space that belongs to the test split


def _sample_scene(rng: np.random.Generator, n_objects: int) -> tuple:
    """Scene parameters: per object (cell, shape, colour, size, dy, dx, jittered rgb)."""
    cells = rng.choice(CELLS * CELLS, size=n_objects, replace=False)
    shapes = rng.choice(len(SHAPES), size=n_objects, replace=False)
    colours = rng.choice(len(COLOURS), size=n_objects, replace=False)
    scene = []
    for cell, shape, colour in zip(cells, shapes, colours, strict=True):
        size = int(rng.integers(11, 15))
        slack = CELL - size  # the object stays inside its cell
        dy, dx = (int(v) for v in rng.integers(max(0, slack // 2 - 1), min(slack, slack // 2 + 1) + 1, 2))
        base = np.array(list(COLOURS.values())[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
        scene.append((divmod(int(cell), CELLS), SHAPES[shape], list(COLOURS)[colour], size, dy, dx, rgb))
    return tuple(scene)


def render(scene: tuple) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """Draw a scene; returns the RGB image and its objects with pixel and patch masks."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND
    objects = draw_objects(pixels, scene, CELL, PATCH)
    return Image.fromarray(pixels, "RGB"), objects


def _question(
    rng: np.random.Generator, kind: str, objects: tuple[ShapeObject, ...]
) -> tuple[str, str, ShapeObject | None]:
    """(question, answer, asked-about object or None)."""
    obj = objects[int(rng.integers(len(objects)))]
    if kind == "colour_of_shape":
        return f"what colour is the {obj.shape} ?", obj.colour, obj
    if kind == "shape_of_colour":
        return f"what shape is the {obj.colour} object ?", obj.shape, obj
    if kind == "position":
        return f"what shape is at the {position_name(obj.cell)} ?", obj.shape, obj
    if kind != "exists":
        raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")
    question, answer, about = exists_question(rng, obj, objects, SHAPES)
    return question, answer, obj if about else None


def make_scene(split: str, seed: int, index: int, n_objects: int | None = None):
    """Image ``index`` of ``split`` for ``seed``: (PIL image, objects)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], seed, index])
    count = int(rng.integers(1, 4)) if n_objects is None else n_objects
    while True:
        scene = _sample_scene(rng, count)
        if split_of(scene, TEST_FRACTION) == split:
            return render(scene)


def make_question(
    objects: tuple[ShapeObject, ...], split: str, seed: int, index: int, turn: int = 0
) -> tuple[str, str, QuestionType, np.ndarray]:
    """Question ``turn`` about image ``index``: (question, answer, question type, target mask). The type
    cycles through QUESTION_TYPES with ``index + turn``."""
    rng = np.random.default_rng([SPLITS[split], seed, index, 1 + turn])
    kind = QUESTION_TYPES[(index + turn) % len(QUESTION_TYPES)]
    question, answer, target = _question(rng, kind, objects)
    target_mask = target.patch_mask.copy() if target is not None else np.zeros((GRID, GRID), dtype=bool)
    return question, answer, kind, target_mask


def make_item(split: str, seed: int, index: int, n_objects: int | None = None) -> ShapesItem:
    """Item ``index`` of ``split`` for ``seed`` (its image with its first question)."""
    image, objects = make_scene(split, seed, index, n_objects)
    question, answer, kind, target_mask = make_question(objects, split, seed, index)
    return ShapesItem(image, prompt_for(question), question, answer, kind, objects, target_mask)


def generator(organism: str = "shapes"):
    """The module that generates ``organism``'s scenes and questions (``data`` for "shapes", ``scenes`` for
    "scenes"); each has the same names (``IMAGE_SIZE``, ``PATCH``, ``GRID``, ``QUESTION_TYPES``, ``make_item``,
    ...)."""
    modules = {NAME: sys.modules[__name__], scenes.NAME: scenes}
    if organism not in modules:
        raise ValueError(f"unknown organism {organism!r}; available: {tuple(modules)}")
    return modules[organism]


class ShapesDataset(Sequence):
    """``size`` deterministic items of ``split`` ("train" or "test") for ``seed`` from ``organism``'s scene
    generator ("shapes", the default, or "scenes"); a ``Sequence``, so every function that takes a list of
    items takes it too. Masks are on that organism's patch grid (3 x 3 or 8 x 8).

    >>> data = ShapesDataset(split="test", seed=0, size=8)
    >>> data[3].question_type
    'position'
    >>> ShapesDataset(split="test", seed=0, size=8, organism="scenes")[4].question_type
    'count'
    """

    def __init__(
        self,
        split: str = "test",
        seed: int = 0,
        size: int = 500,
        n_objects: int | None = None,
        organism: str = "shapes",
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.source = generator(organism)
        top = self.source.MAX_OBJECTS
        if n_objects is not None and not 1 <= n_objects <= top:
            raise ValueError(
                f"n_objects must be between 1 and {top} for the {organism!r} organism (or None for a random "
                f"count), got {n_objects}"
            )
        self.split, self.seed, self.size, self.n_objects, self.organism = (
            split,
            seed,
            size,
            n_objects,
            organism,
        )

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int | slice) -> ShapesItem | list[ShapesItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        return self.source.make_item(self.split, self.seed, index % self.size, self.n_objects)

    def __iter__(self) -> Iterator[ShapesItem]:
        return (self[i] for i in range(self.size))
