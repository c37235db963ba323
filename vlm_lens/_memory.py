"""Returning freed heap memory to the operating system while weights move (glibc only).

Loading frees each source tensor right after its converted copy is made, but glibc keeps freed chunks
inside its heap (its mmap threshold grows as large buffers are freed, so later copies come from the
heap) and they are reused only by allocations that fit. Without trimming, the process's resident size
keeps growing while the live memory does not; ``malloc_trim`` hands whole free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim, nothing lost
        logger.debug("malloc_trim is not available; freed memory stays with the allocator.")
        return None


def release_freed_memory() -> None:
    """Give the allocator's whole free pages back to the OS; a no-op where that is not available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Trimmer:
    """Calls ``release_freed_memory`` each time another ``every_bytes`` of tensors have been freed."""

    def __init__(self, every_bytes: int) -> None:
        self.every_bytes = max(int(every_bytes), 1)
        self.pending = 0

    def freed(self, n_bytes: int) -> None:
        self.pending += n_bytes
        if self.pending >= self.every_bytes:
            release_freed_memory()
            self.pending = 0
