"""Interleaved timing: every case runs once per round (A B C A B C ...), after warm-up rounds.

Interleaving spreads slow drifts (thermal, other jobs on a shared machine) over all cases instead of
charging them to whichever ran last; medians ignore the odd stall. Ratios are taken between medians
of the same rounds.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                device: str = "cpu") -> dict[str, dict[str, float]]:
    """Seconds per call of each case: median, min, max and all samples, over ``rounds`` rounds."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # collections land on random cases otherwise; we collect between rounds instead
    try:
        for _ in range(rounds):
            for name, fn in cases.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                samples[name].append(time.perf_counter() - start)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples_s": s}
            for name, s in samples.items()}


def tensor_bytes(tensors) -> tuple[int, int]:
    """(sum of each tensor's own bytes, bytes of the distinct storages actually held)."""
    total, storages = 0, {}
    for t in tensors:
        total += t.numel() * t.element_size()
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return total, sum(storages.values())
