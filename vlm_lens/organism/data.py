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

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
PATCH = 16
GRID = IMAGE_SIZE // PATCH  # patches per side (3)
CELL = 16
CELLS = IMAGE_SIZE // CELL  # cells per side (3)
BACKGROUND = (24, 24, 24)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (235, 235, 235),
}
POSITIONS = (
    ("top", "left"), ("top", "middle"), ("top", "right"),
    ("middle", "left"), ("centre",), ("middle", "right"),
    ("bottom", "left"), ("bottom", "middle"), ("bottom", "right"),
)  # fmt: skip
QUESTION_TYPES = ("colour_of_shape", "shape_of_colour", "exists", "position")
QuestionType = Literal["colour_of_shape", "shape_of_colour", "exists", "position"]
ANSWERS = (*SHAPES, *COLOURS, "yes", "no")
SPLITS = {"train": 0, "test": 1}
TEST_FRACTION = 0.2  # share of scene space that belongs to the test split


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: ``pixel_mask`` is bool [H, W], ``patch_mask`` bool [GRID, GRID]."""

    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col) in the 3 x 3 cell grid
    pixel_mask: np.ndarray
    patch_mask: np.ndarray


@dataclass(frozen=True)
class ShapesItem:
    """One image with one question and its one-token answer."""

    image: Image.Image
    prompt: str
    question: str
    answer: str
    question_type: QuestionType
    objects: tuple[ShapeObject, ...]
    target_mask: np.ndarray  # bool [GRID, GRID]; all False when no object is asked about


def prompt_for(question: str) -> str:
    """The chat prompt the organism was trained on: the question, then the ``<image>`` placeholder.

    The question comes first so the image tokens can attend to it; with the image first, binding a
    shape to its colour did not emerge in training (see README.md).
    """
    return f"USER: {question}\n<image> ASSISTANT:"


def position_name(cell: tuple[int, int]) -> str:
    return " ".join(POSITIONS[cell[0] * CELLS + cell[1]])


def shape_pixels(shape: str, size: int) -> np.ndarray:
    """Bool [size, size] mask of ``shape`` drawn to fill a ``size`` box."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    s = size - 1
    if shape == "circle":
        draw.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        inset = size // 8
        draw.rectangle((inset, inset, s - inset, s - inset), fill=255)
    elif shape == "triangle":
        draw.polygon(((s / 2, 0), (s, s), (0, s)), fill=255)
    elif shape == "cross":
        arm = size // 3
        lo, hi = (size - arm) // 2, (size - arm) // 2 + arm - 1
        draw.rectangle((lo, 0, hi, s), fill=255)
        draw.rectangle((0, lo, s, hi), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas) > 0


def patch_mask_of(pixel_mask: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Bool [H/patch, W/patch]: True where the patch holds at least one True pixel."""
    h, w = pixel_mask.shape
    if h % patch or w % patch:
        raise ValueError(f"mask shape {pixel_mask.shape} is not a multiple of the patch size {patch}")
    return pixel_mask.reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3))


def _split_of(scene: tuple) -> str:
    digest = hashlib.sha256(repr(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "little") / 2**64 < TEST_FRACTION else "train"


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
    objects = []
    for (row, col), shape, colour, size, dy, dx, rgb in scene:
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        top, left = row * CELL + dy, col * CELL + dx
        mask[top : top + size, left : left + size] = shape_pixels(shape, size)
        pixels[mask] = rgb
        objects.append(ShapeObject(shape, colour, (row, col), mask, patch_mask_of(mask)))
    return Image.fromarray(pixels, "RGB"), tuple(objects)


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
    if rng.random() < 0.5:
        return f"is there a {obj.colour} {obj.shape} ?", "yes", obj
    present = {(o.colour, o.shape) for o in objects}
    if len(objects) > 1 and rng.random() < 0.5:  # hard negative: a colour and a shape that are both present
        pairs = [(a.colour, b.shape) for a in objects for b in objects if a is not b]
    else:
        pairs = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    return f"is there a {colour} {shape} ?", "no", None


def make_scene(split: str, seed: int, index: int, n_objects: int | None = None):
    """Image ``index`` of ``split`` for ``seed``: (PIL image, objects)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], seed, index])
    count = int(rng.integers(1, 4)) if n_objects is None else n_objects
    while True:
        scene = _sample_scene(rng, count)
        if _split_of(scene) == split:
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


class ShapesDataset(Sequence):
    """``size`` deterministic items of ``split`` ("train" or "test") for ``seed``; a ``Sequence``, so every
    function that takes a list of items takes it too.

    >>> data = ShapesDataset(split="test", seed=0, size=8)
    >>> data[3].question_type
    'position'
    """

    def __init__(self, split: str = "test", seed: int = 0, size: int = 500, n_objects: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if n_objects is not None and not 1 <= n_objects <= 3:
            raise ValueError(f"n_objects must be 1, 2 or 3 (or None for a random count), got {n_objects}")
        self.split, self.seed, self.size, self.n_objects = split, seed, size, n_objects

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int | slice) -> ShapesItem | list[ShapesItem]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        return make_item(self.split, self.seed, index % self.size, self.n_objects)

    def __iter__(self) -> Iterator[ShapesItem]:
        return (self[i] for i in range(self.size))
