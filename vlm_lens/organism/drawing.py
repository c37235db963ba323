"""Drawing primitives and item types shared by the organisms' scene generators (``data``, ``scenes``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SPLITS = {"train": 0, "test": 1}

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


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object: ``pixel_mask`` is bool [H, W], ``patch_mask`` bool [GRID, GRID]."""

    shape: str
    colour: str
    cell: tuple[int, int]  # (row, col) in the 3 x 3 layout of cells
    pixel_mask: np.ndarray
    patch_mask: np.ndarray


@dataclass(frozen=True)
class ShapesItem:
    """One image with one question and its answer (one word, or a short phrase for ``describe``)."""

    image: Image.Image
    prompt: str
    question: str
    answer: str
    question_type: str
    objects: tuple[ShapeObject, ...]
    target_mask: np.ndarray  # bool [GRID, GRID]; all False when the answer depends on no object


def prompt_for(question: str) -> str:
    """The chat prompt the organism was trained on: the question, then the ``<image>`` placeholder.

    The question comes first so the image tokens can attend to it; with the image first, binding a
    shape to its colour did not emerge in training (see README.md).
    """
    return f"USER: {question}\n<image> ASSISTANT:"


def position_name(cell: tuple[int, int]) -> str:
    return " ".join(POSITIONS[cell[0] * 3 + cell[1]])


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
    elif shape == "diamond":
        draw.polygon(((s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)), fill=255)
    elif shape == "cross":
        arm = size // 3
        lo, hi = (size - arm) // 2, (size - arm) // 2 + arm - 1
        draw.rectangle((lo, 0, hi, s), fill=255)
        draw.rectangle((0, lo, s, hi), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected circle, square, triangle, diamond or cross")
    return np.asarray(canvas) > 0


def patch_mask_of(pixel_mask: np.ndarray, patch: int) -> np.ndarray:
    """Bool [H/patch, W/patch]: True where the patch holds at least one True pixel."""
    h, w = pixel_mask.shape
    if h % patch or w % patch:
        raise ValueError(f"mask shape {pixel_mask.shape} is not a multiple of the patch size {patch}")
    return pixel_mask.reshape(h // patch, patch, w // patch, patch).any(axis=(1, 3))


def split_of(scene: tuple, test_fraction: float) -> str:
    """The split a scene belongs to: its parameters hashed to [0, 1), "test" below ``test_fraction``."""
    digest = hashlib.sha256(repr(scene).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "little") / 2**64 < test_fraction else "train"


def draw_objects(pixels: np.ndarray, params, cell: int, patch: int) -> tuple[ShapeObject, ...]:
    """Paint each object ``(cell (row, col), shape, colour, size, dy, dx, rgb)`` of a scene into ``pixels``
    (uint8 [H, W, 3], in place), at offset (dy, dx) inside its ``cell``-pixel cell; returns the objects with
    their pixel masks and their patch masks on the ``patch``-pixel grid."""
    height, width = pixels.shape[:2]
    objects = []
    for (row, col), shape, colour, size, dy, dx, rgb in params:
        mask = np.zeros((height, width), dtype=bool)
        top, left = row * cell + dy, col * cell + dx
        mask[top : top + size, left : left + size] = shape_pixels(shape, size)
        pixels[mask] = rgb
        objects.append(ShapeObject(shape, colour, (row, col), mask, patch_mask_of(mask, patch)))
    return tuple(objects)


def exists_question(rng: np.random.Generator, obj: ShapeObject, objects, shapes) -> tuple[str, str, bool]:
    """ "is there a <colour> <shape> ?": about ``obj`` ("yes") half the time; otherwise a pair that is not in
    the image ("no"), half of them (with two or more objects) a colour and a shape that are both present.
    Returns (question, answer, whether it asks about ``obj``)."""
    if rng.random() < 0.5:
        return f"is there a {obj.colour} {obj.shape} ?", "yes", True
    present = {(o.colour, o.shape) for o in objects}
    if len(objects) > 1 and rng.random() < 0.5:  # hard negative: a colour and a shape that are both present
        pairs = [(a.colour, b.shape) for a in objects for b in objects if a is not b]
    else:
        pairs = [(c, s) for c in COLOURS for s in shapes if (c, s) not in present]
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    return f"is there a {colour} {shape} ?", "no", False
