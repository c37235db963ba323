"""Scenes for the ``scenes`` organism: an 8 x 8 patch grid, objects that span patches, up to five per image.

Each image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` pixels (96) on a noisy dark background with grey distractor
strokes and specks. One to five objects, with distinct shapes (five) and distinct colours (six), sit in
distinct cells of a 3 x 3 layout of ``CELL`` (32) pixel cells, each drawn 16 to 24 px wide at a random
offset inside its cell. The vision tower cuts the image into ``PATCH`` (12) pixel patches, an 8 x 8 grid;
cells are not aligned with patches, so an object covers one to three patches a side (mostly two or three)
and most straddle patch borders.

Patch-mask rule (as for the ``shapes`` organism): ``patch_mask[r, c]`` is True iff the 12 x 12 block of
pixels of patch ``(r, c)`` holds at least one pixel of the object. Two objects in neighbouring cells can
share a patch.

Questions (the type cycles with the item index):

- ``colour_of_shape`` "what colour is the circle ?" -> a colour
- ``shape_of_colour`` "what shape is the red object ?" -> a shape
- ``exists`` "is there a red circle ?" -> yes / no (half of the "no"s pair a present colour and shape)
- ``position`` "what shape is at the top left ?" -> a shape (cells of the 3 x 3 layout)
- ``count`` "how many objects are there ?" -> one ... five
- ``relative`` "is the red circle left of the square ?" -> yes / no (left of, right of, above, below: by cell)
- ``describe`` "what is at the top left ?" -> "red circle" (two words, then ``</s>``)

``target_mask`` is the union of the patch masks of the objects the answer depends on: the asked-about
object; both objects of a ``relative`` question; every object for ``count``; none for an ``exists`` "no".

Train and test never share an image: a scene's parameters (which fix its pixels, noise included) are
hashed into a split, and each split keeps only its own scenes.

>>> from vlm_lens.organism import ShapesDataset
>>> item = ShapesDataset(split="test", seed=0, size=7, organism="scenes")[6]
>>> item.image.size, item.question_type, len(item.answer.split())
((96, 96), 'describe', 2)
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vlm_lens.organism.drawing import (
    COLOURS,
    SPLITS,
    ShapeObject,
    ShapesItem,
    draw_objects,
    exists_question,
    position_name,
    prompt_for,
    split_of,
)

NAME = "scenes"
IMAGE_SIZE = 96
PATCH = 12
GRID = IMAGE_SIZE // PATCH  # 8 patches a side
CELL = 32
CELLS = IMAGE_SIZE // CELL  # 3 x 3 layout of cells
MAX_OBJECTS = 5
BACKGROUND = (24, 24, 24)
NOISE = 6.0  # standard deviation of the background's per-pixel noise
TEST_FRACTION = 0.2

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
NUMBERS = ("one", "two", "three", "four", "five")
RELATIONS = ("left of", "right of", "above", "below")
QUESTION_TYPES = ("colour_of_shape", "shape_of_colour", "exists", "position", "count", "relative", "describe")
ANSWERS = (*SHAPES, *COLOURS, "yes", "no", *NUMBERS)
# Words of the questions and answers (the tokenizer's vocabulary is these plus the chat words).
WORDS = (
    "what", "colour", "shape", "is", "the", "object", "at", "there", "a", "how", "many", "objects", "are",
    "of", *ANSWERS, "top", "middle", "bottom", "left", "right", "centre", "above", "below",
)  # fmt: skip


def _sample_scene(rng: np.random.Generator, n_objects: int) -> tuple:
    """Scene parameters: ``(objects, clutter, noise_seed)``; per object (cell, shape, colour, size, dy, dx,
    jittered rgb); clutter is a tuple of grey strokes and specks."""
    cells = rng.choice(CELLS * CELLS, size=n_objects, replace=False)
    shapes = rng.choice(len(SHAPES), size=n_objects, replace=False)
    colours = rng.choice(len(COLOURS), size=n_objects, replace=False)
    objects = []
    for cell, shape, colour in zip(cells, shapes, colours, strict=True):
        size = int(rng.integers(16, 25))
        dy, dx = (int(v) for v in rng.integers(0, CELL - size + 1, 2))
        base = np.array(list(COLOURS.values())[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
        objects.append((divmod(int(cell), CELLS), SHAPES[shape], list(COLOURS)[colour], size, dy, dx, rgb))
    clutter = []
    for _ in range(int(rng.integers(1, 4))):  # thin grey strokes
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, IMAGE_SIZE, 4))
        clutter.append(("line", x0, y0, x1, y1, int(rng.integers(55, 95))))
    for _ in range(int(rng.integers(3, 9))):  # grey specks
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - 3, 2))
        clutter.append(
            (
                "speck",
                x,
                y,
                x + int(rng.integers(1, 4)),
                y + int(rng.integers(1, 4)),
                int(rng.integers(55, 95)),
            )
        )
    return tuple(objects), tuple(clutter), int(rng.integers(2**31))


def render(scene: tuple) -> tuple[Image.Image, tuple[ShapeObject, ...]]:
    """Draw a scene; returns the RGB image and its objects with pixel and patch masks."""
    objects_params, clutter, noise_seed = scene
    noise = np.random.default_rng(noise_seed).normal(0.0, NOISE, (IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.clip(np.array(BACKGROUND, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(canvas)
    for kind, x0, y0, x1, y1, grey in clutter:
        if kind == "line":
            draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=1)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=(grey, grey, grey))
    pixels = np.array(canvas)
    objects = draw_objects(pixels, objects_params, CELL, PATCH)
    return Image.fromarray(pixels, "RGB"), objects


def make_scene(
    split: str, seed: int, index: int, n_objects: int | None = None, max_objects: int = MAX_OBJECTS
):
    """Image ``index`` of ``split`` for ``seed``: (PIL image, objects). The object count is ``n_objects``,
    or drawn uniformly from 1 to ``max_objects`` (the training curriculum lowers it early on). Images whose
    first question is ``relative`` get at least two objects."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([SPLITS[split], seed, index, 7])
    least = 2 if QUESTION_TYPES[index % len(QUESTION_TYPES)] == "relative" else 1
    count = int(rng.integers(least, max(least, max_objects) + 1)) if n_objects is None else n_objects
    while True:
        scene = _sample_scene(rng, count)
        if split_of(scene, TEST_FRACTION) == split:
            return render(scene)


def holds(relation: str, a: ShapeObject, b: ShapeObject) -> bool:
    """Whether ``a`` is ``relation`` (one of RELATIONS) ``b``, by cell."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def _relative(rng: np.random.Generator, objects: tuple[ShapeObject, ...]):
    """A yes/no question about two objects whose cells differ along the relation's axis; ``None`` when the
    image has one object."""
    pairs = [(a, b) for a in objects for b in objects if a is not b]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    axis = ["left of", "right of"] if a.cell[1] != b.cell[1] else []
    axis += ["above", "below"] if a.cell[0] != b.cell[0] else []
    want = bool(rng.random() < 0.5)
    candidates = [r for r in axis if holds(r, a, b) == want] or axis
    relation = candidates[int(rng.integers(len(candidates)))]
    answer = "yes" if holds(relation, a, b) else "no"
    return f"is the {a.colour} {a.shape} {relation} the {b.shape} ?", answer, (a, b)


def question(rng: np.random.Generator, kind: str, objects: tuple[ShapeObject, ...]):
    """(question, answer, objects the answer depends on)."""
    obj = objects[int(rng.integers(len(objects)))]
    if kind == "colour_of_shape":
        return f"what colour is the {obj.shape} ?", obj.colour, (obj,)
    if kind == "shape_of_colour":
        return f"what shape is the {obj.colour} object ?", obj.shape, (obj,)
    if kind == "position":
        return f"what shape is at the {position_name(obj.cell)} ?", obj.shape, (obj,)
    if kind == "describe":
        return f"what is at the {position_name(obj.cell)} ?", f"{obj.colour} {obj.shape}", (obj,)
    if kind == "count":
        return "how many objects are there ?", NUMBERS[len(objects) - 1], objects
    if kind == "relative":
        asked = _relative(rng, objects)
        if asked is not None:
            return asked
        kind = "exists"  # one object: nothing to relate; item types still cycle by index (see make_question)
    if kind != "exists":
        raise ValueError(f"unknown question type {kind!r}; expected one of {QUESTION_TYPES}")
    question, answer, about = exists_question(rng, obj, objects, SHAPES)
    return question, answer, (obj,) if about else ()


def make_question(objects: tuple[ShapeObject, ...], split: str, seed: int, index: int, turn: int = 0):
    """Question ``turn`` about image ``index``: (question, answer, question type, target mask). The type
    cycles through QUESTION_TYPES with ``index + turn``; a ``relative`` question about a one-object image
    is asked as ``exists`` (and typed so)."""
    rng = np.random.default_rng([SPLITS[split], seed, index, 1 + turn, 7])
    kind = QUESTION_TYPES[(index + turn) % len(QUESTION_TYPES)]
    if kind == "relative" and len(objects) < 2:
        kind = "exists"
    text, answer, targets = question(rng, kind, objects)
    target_mask = np.zeros((GRID, GRID), dtype=bool)
    for obj in targets:
        target_mask |= obj.patch_mask
    return text, answer, kind, target_mask


def make_item(split: str, seed: int, index: int, n_objects: int | None = None) -> ShapesItem:
    """Item ``index`` of ``split`` for ``seed`` (its image with its first question)."""
    image, objects = make_scene(split, seed, index, n_objects)
    text, answer, kind, target_mask = make_question(objects, split, seed, index)
    return ShapesItem(image, prompt_for(text), text, answer, kind, objects, target_mask)
