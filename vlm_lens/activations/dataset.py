"""Reading a dataset of (image(s), prompt) items: item fields, a cheap identity, and this rank's items.

An item is an object or a mapping with ``prompt`` and ``image`` (one image or None) or ``images`` (a
list); ``id`` is optional (the dataset index stands in). ``ShapesDataset`` items are such objects.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


@dataclass(frozen=True)
class Item:
    """One dataset item as extraction needs it."""

    index: int
    id: Any  # JSON-ready: int, float, str or None -> the index
    prompt: str
    images: list[Any]
    raw: Any  # the dataset's own item, as given to a positions function


def read_item(index: int, item: Any) -> Item:
    prompt = _field(item, "prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"dataset item {index} has no text prompt (got {type(prompt).__name__}); items need a "
                         "`prompt` string and an `image` (or `images` list), as attributes or mapping keys.")
    images = _field(item, "images")
    if images is None:
        image = _field(item, "image")
        images = [] if image is None else [image]
    elif not isinstance(images, (list, tuple)):
        images = [images]
    item_id = _field(item, "id")
    item_id = index if item_id is None else item_id
    if not isinstance(item_id, (int, float, str)):
        item_id = str(item_id)
    return Item(index, item_id, prompt, list(images), item)


def check_placeholders(items: list[Item], placeholder: str) -> None:
    """An item whose prompt has more image placeholders than images is an error naming the item."""
    for it in items:
        n = it.prompt.count(placeholder)
        if n > len(it.images):
            raise ValueError(
                f"dataset item {it.index} (id {it.id!r}) has {n} {placeholder!r} placeholder(s) in its prompt but "
                f"{len(it.images)} image(s). Give the item its image(s) or remove the placeholder; nothing was "
                "written for it, and a second call with the same arguments resumes after the last complete shard."
            )


class DatasetReader:
    """Items by index range from a sequence (random access) or an iterable (read once, in order)."""

    def __init__(self, dataset: Any):
        self.indexable = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        self.length = len(dataset) if hasattr(dataset, "__len__") else None
        self._dataset = dataset
        self._iterator: Iterator[Any] | None = None
        self._first: Any = None
        if self.length == 0:
            raise ValueError("the dataset is empty; give at least one item.")
        if not self.indexable:
            if not isinstance(dataset, Iterable):
                raise ValueError(f"dataset must be a sequence or an iterable of items, got {type(dataset).__name__}.")
            iterator = iter(dataset)
            try:
                self._first = next(iterator)
            except StopIteration:
                raise ValueError("the dataset is empty; give at least one item.") from None
            self._iterator = itertools.chain([self._first], iterator)
        else:
            self._first = dataset[0]

    def identity(self) -> dict[str, Any]:
        """What tells two datasets apart cheaply: class name (not module: a script may run as ``__main__``),
        length and a hash of the first item."""
        first = read_item(0, self._first)
        digest = hashlib.sha256(first.prompt.encode())
        for image in first.images:
            digest.update(np.ascontiguousarray(np.asarray(image)).tobytes())
        return {"type": type(self._dataset).__qualname__, "length": self.length,
                "first_item_sha256": digest.hexdigest()[:16]}

    def items(self, start: int, stop: int | None) -> Iterator[Item]:
        """Items ``start <= index < stop`` (stop None: to the end). An iterable is consumed once."""
        if self.indexable:
            stop = self.length if stop is None else min(stop, self.length)
            return (read_item(i, self._dataset[i]) for i in range(start, stop))
        if self._iterator is None:
            raise ValueError("this iterable dataset was already read once; pass a sequence or a fresh iterable.")
        iterator, self._iterator = self._iterator, None
        picked = itertools.islice(iterator, start, stop)
        return (read_item(i, item) for i, item in zip(itertools.count(start), picked))
