"""How CPU memory comes from and goes back to the operating system (glibc and Linux; everything here is a
no-op elsewhere).

``populate_for_write`` faults a tensor's pages in for writing in one call, before weight processing writes
into weights memory-mapped from the checkpoint. Beyond that, two opposite needs:

- Loading frees each source tensor right after its converted copy is made, but glibc keeps freed chunks
  inside its heap (its mmap threshold grows as large buffers are freed, so later copies come from the
  heap) and they are reused only by allocations that fit. Without trimming, the process's resident size
  keeps growing while the live memory does not; ``malloc_trim`` hands whole free pages back
  (``release_freed_memory``, ``Trimmer``).
- ``run_with_cache`` of everything allocates hundreds of MB of activations per call. When the cache is
  dropped, glibc hands the top of its heap back to the OS (it trims whatever exceeds 64 MiB), so the
  next call page-faults every byte in again: on the benchmark model that doubled the cost of a call
  (93,000 faults, 0.65 s against a 0.5 s forward). With ``reuse_cache_memory(True)`` (or the environment
  variable ``VLM_LENS_REUSE_CACHE_MEMORY=1``), ``keep_cache_memory`` raises glibc's trim threshold to
  twice the largest cache seen so far, so a dropped cache's memory is reused by the next one, as
  PyTorch's caching allocator does on GPUs. It is off by default: the allocator is process-wide, and a
  library should not change it for every other library in the process unasked. Allocator settings the
  user made through ``MALLOC_*`` environment variables or ``GLIBC_TUNABLES`` are never overridden. The
  usual alternative is to run PyTorch on CPU with jemalloc or tcmalloc (``LD_PRELOAD``), which keep
  freed memory for reuse themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)


@functools.cache
def _libc_function(name: str) -> Any:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): its allocator keeps its own policy
        logger.debug("%s is not available; the allocator's own policy applies.", name)
        return None


def _malloc_trim() -> Any:
    return _libc_function("malloc_trim")


def _mallopt() -> Any:
    return _libc_function("mallopt")


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


MADV_POPULATE_WRITE = 23  # <sys/mman.h>, Linux >= 5.14


def populate_for_write(tensor: torch.Tensor) -> None:
    """Fault in the pages under a CPU tensor for writing, in one system call (a no-op where refused).

    Weight processing writes into weights memory-mapped from the checkpoint (privately: the pages written
    are copied into the process). Left to the in-place op, each page is first mapped read-only by its
    reads, then copied on its first write, which also has to invalidate the read-only mapping on every CPU
    the process's threads ran on; populated for writing, each page is copied once, straight into a
    writable mapping (on the benchmark model, 0.19 s of CPU instead of 0.23 s for processing). Pages at the
    tensor's ends may hold neighbouring tensors too: copying them keeps their contents.
    """
    madvise = _madvise()
    if madvise is None or tensor.device.type != "cpu" or not tensor.numel():
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr() // page * page
    end = -(-(tensor.data_ptr() + span_bytes(tensor)) // page) * page
    madvise(start, end - start, MADV_POPULATE_WRITE)  # fails (EINVAL) on older kernels: pages fault as usual


def span_bytes(tensor: torch.Tensor) -> int:
    """Bytes from a tensor's first element to just past its last (a view's gaps included)."""
    return (1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))) * tensor.element_size()


@functools.cache
def _madvise() -> Any:
    madvise = _libc_function("madvise")
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


# <malloc.h>; mallopt takes an int, so the trim threshold cannot exceed INT_MAX.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
INT_MAX = 2**31 - 1
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its own dynamic threshold on 64-bit machines
DEFAULT_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # where glibc's dynamic trim threshold ends up
MARGIN = 64 * 2**20  # other freed buffers (temporaries of the forward) lie beside the cache
ENV_SWITCH = "VLM_LENS_REUSE_CACHE_MEMORY"
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


class _CacheMemory:
    """Process-wide state of ``keep_cache_memory`` (the allocator is process-wide too)."""

    enabled: bool | None = None  # None: not decided yet (read the environment on first use)
    trim_threshold = 0  # what we set; 0 while glibc's own settings apply


def _user_configured() -> str | None:
    for name in USER_SETTINGS:
        if name in os.environ:
            return name
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _enabled() -> bool:
    if _CacheMemory.enabled is None:
        _CacheMemory.enabled = os.environ.get(ENV_SWITCH, "0").strip().lower() in ("1", "true", "yes", "on")
    return _CacheMemory.enabled


def cpu_bytes(tensors: Any) -> int:
    """Bytes of the distinct CPU storages behind ``tensors`` (views of one buffer count once)."""
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def keep_cache_memory(cache_bytes: int) -> int:
    """Let glibc keep up to twice ``cache_bytes`` (plus a margin) of freed memory for the next cache.

    Called after each CPU ``run_with_cache`` with the bytes the cache holds; the threshold only grows,
    so it follows the largest cache of the session. Returns the trim threshold now in force (0 where
    glibc's own policy applies: switched off, configured by the user, or not glibc).
    """
    if cache_bytes <= 0 or not _enabled():  # nothing on the CPU (a GPU model's cache): nothing to keep
        return _CacheMemory.trim_threshold
    mallopt = _mallopt()
    if mallopt is None:
        return 0
    if not _CacheMemory.trim_threshold:
        setting = _user_configured()
        if setting is not None:
            logger.debug("%s is set: vlm_lens leaves the allocator's settings alone.", setting)
            return 0
    wanted = min(INT_MAX, 2 * int(cache_bytes) + MARGIN)
    if wanted <= _CacheMemory.trim_threshold:
        return _CacheMemory.trim_threshold
    # Setting either value turns off glibc's dynamic thresholds, so both are set: buffers up to 32 MiB
    # come from the heap (as glibc's dynamic threshold would settle), larger ones are mapped and unmapped.
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, wanted)):
        warnings.warn("glibc's mallopt refused vlm_lens's cache memory settings; freed caches go back to the "
                      "operating system as usual and each run_with_cache faults its memory in again.", stacklevel=3)
        _CacheMemory.enabled = False
        return 0
    if not _CacheMemory.trim_threshold:
        logger.info(
            "vlm_lens keeps up to %d MiB of freed memory in the process for the next run_with_cache "
            "(glibc trim threshold); vlm_lens.reuse_cache_memory(False) turns this off (%s).",
            wanted >> 20, ENV_SWITCH,
        )
    _CacheMemory.trim_threshold = wanted
    return wanted


def reuse_cache_memory(enabled: bool = True) -> None:
    """Whether CPU ``run_with_cache`` keeps freed cache memory for the next call (default: off).

    A full cache allocates hundreds of MB per call; with glibc's default settings that memory goes back
    to the operating system when the cache is dropped and the next call page-faults it in again, which
    can double the call's time. While on, glibc keeps up to twice the largest cache of the session (at
    most 2 GiB) in the process: it changes the allocator for the whole process, which is why it is
    opt-in. Turning it off hands the kept memory back now and puts both thresholds back where glibc's
    own policy had them: a 32 MiB mmap threshold and a trim threshold of twice that, the values glibc's
    dynamic thresholds reach in any process that has freed a 32 MiB buffer (glibc can neither report
    its thresholds nor resume adjusting them once set). The environment variable
    ``VLM_LENS_REUSE_CACHE_MEMORY=1`` turns it on without code. Alternative: jemalloc or tcmalloc.
    """
    _CacheMemory.enabled = bool(enabled)
    if enabled or not _CacheMemory.trim_threshold:
        return
    mallopt = _mallopt()
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    _CacheMemory.trim_threshold = 0
    release_freed_memory()


def cache_memory_enabled() -> bool:
    return _enabled()
