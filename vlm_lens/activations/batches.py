"""Batches of items, read and prepared (``model.prepare``, right padding), optionally ahead of the forward
pass in one background thread, so reading images and running the processor overlap the model.

The batches are the same with or without the thread: consecutive items, ``batch_size`` at a time.
An error while reading or preparing (e.g. an item without its image) is raised when its batch is
reached, after every batch before it has been used.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from vlm_lens.activations.dataset import Item
from vlm_lens.inputs import VLMInputs

Prepared = tuple[list[Item], VLMInputs]
_END = object()


def _chunks(items: Iterable[Item], batch_size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepared_batches(items: Iterable[Item], batch_size: int, prepare: Callable[[list[Item]], VLMInputs],
                     prefetch: int) -> Iterator[Prepared]:
    """``(items, inputs)`` per batch; with ``prefetch`` > 0, up to that many batches are prepared ahead."""
    if prefetch <= 0:
        for batch in _chunks(items, batch_size):
            yield batch, prepare(batch)
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in _chunks(items, batch_size):
                if not put((batch, prepare(batch))):
                    return
        except BaseException as err:  # handed to the consumer, raised there in order
            put(err)
            return
        put(_END)

    thread = threading.Thread(target=work, name="vlm_lens-extract-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _END:
                return
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
