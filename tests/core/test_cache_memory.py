"""CPU run_with_cache keeps a dropped cache's memory for the next call (glibc's trim threshold)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vlm_lens
from vlm_lens import _memory
from vlm_lens.testing import image_prompt_tokens, random_pixels


class FakeMallopt:
    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.result = result

    def __call__(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def mallopt(monkeypatch):
    """A recording mallopt and fresh process state; the real allocator is not touched."""
    fake = FakeMallopt()
    monkeypatch.setattr(_memory, "_mallopt", lambda: fake)
    monkeypatch.setattr(_memory, "release_freed_memory", lambda: fake.calls.append(("trim", 0)))
    monkeypatch.setattr(_memory._CacheMemory, "enabled", True)  # opted in (tests of the default set it back)
    monkeypatch.setattr(_memory._CacheMemory, "trim_threshold", 0)
    for name in (*_memory.USER_SETTINGS, _memory.ENV_SWITCH, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.mark.parametrize("env, expected", [(None, False), ("1", True), ("0", False), ("on", True)])
def test_off_by_default_and_opt_in_by_environment(raw_model, mallopt, monkeypatch, env, expected):
    monkeypatch.setattr(_memory._CacheMemory, "enabled", None)
    if env is not None:
        monkeypatch.setenv(_memory.ENV_SWITCH, env)
    _cache(raw_model)
    assert bool(mallopt.calls) is expected and (_memory._CacheMemory.trim_threshold > 0) is expected


def _cache(model, **kwargs):
    tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens)
    with torch.no_grad():
        return model.run_with_cache(tokens, pixel_values=random_pixels(1), **kwargs)[1]


def test_threshold_follows_the_largest_cache(raw_model, mallopt):
    cache = _cache(raw_model)
    held = _memory.cpu_bytes(cache.values())
    assert held > 0
    wanted = 2 * held + _memory.MARGIN
    assert mallopt.calls == [(_memory.M_MMAP_THRESHOLD, _memory.MMAP_THRESHOLD), (_memory.M_TRIM_THRESHOLD, wanted)]

    _cache(raw_model, names_filter=lambda name: name.endswith("hook_resid_post"))  # smaller: no change
    assert len(mallopt.calls) == 2 and _memory._CacheMemory.trim_threshold == wanted

    assert _memory.keep_cache_memory(10 * held) == 20 * held + _memory.MARGIN  # larger: raised
    assert mallopt.calls[-1] == (_memory.M_TRIM_THRESHOLD, 20 * held + _memory.MARGIN)
    assert _memory.keep_cache_memory(2**40) == _memory.INT_MAX  # mallopt takes an int


def test_nothing_on_the_cpu_changes_nothing(mallopt):
    assert _memory.keep_cache_memory(0) == 0 and mallopt.calls == []


def test_cache_bytes_count_shared_storage_once():
    base = torch.zeros(1000)
    assert _memory.cpu_bytes([base, base[:10], base.view(10, 100), torch.zeros(10)]) == 4000 + 40


def test_switching_off_restores_trimming_and_stops_changes(raw_model, mallopt):
    _cache(raw_model)
    vlm_lens.reuse_cache_memory(False)
    assert mallopt.calls[-3:] == [(_memory.M_MMAP_THRESHOLD, _memory.MMAP_THRESHOLD),
                                  (_memory.M_TRIM_THRESHOLD, _memory.DEFAULT_TRIM_THRESHOLD), ("trim", 0)]
    n_calls = len(mallopt.calls)
    _cache(raw_model)
    assert len(mallopt.calls) == n_calls and _memory._CacheMemory.trim_threshold == 0
    vlm_lens.reuse_cache_memory(True)
    _cache(raw_model)
    assert mallopt.calls[-1][0] == _memory.M_TRIM_THRESHOLD


@pytest.mark.parametrize("name, value", [
    ("MALLOC_TRIM_THRESHOLD_", "1000000"),
    ("MALLOC_MMAP_THRESHOLD_", "65536"),
    ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000"),
])
def test_user_settings_are_left_alone(raw_model, mallopt, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    _cache(raw_model)
    assert mallopt.calls == [] and _memory._CacheMemory.trim_threshold == 0


def test_refused_settings_warn_and_switch_off(mallopt):
    mallopt.result = 0
    with pytest.warns(UserWarning, match="refused"):
        assert _memory.keep_cache_memory(10**6) == 0
    n_calls = len(mallopt.calls)
    assert _memory.keep_cache_memory(10**6) == 0 and len(mallopt.calls) == n_calls


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    """The real allocator, in a fresh process: 200 MiB in 1 MiB blocks, freed and allocated again.

    With glibc's defaults the freed top of the heap goes back to the OS, so every round faults all its
    pages in again; after keep_cache_memory the rounds reuse memory the process kept. (Blocks come
    straight from malloc: Python objects allocated between them would pin the heap's top and hide it.)
    """
    code = textwrap.dedent("""
        import ctypes, resource
        from vlm_lens import _memory

        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        blocks = (ctypes.c_void_p * 200)()

        def faults_of_last_round():
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                for i in range(200):
                    blocks[i] = libc.malloc(2**20)
                for i in range(200):
                    libc.memset(blocks[i], 1, 2**20)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
                for i in range(200):
                    libc.free(blocks[i])
            return faults

        default = faults_of_last_round()
        _memory.reuse_cache_memory(True)
        kept = _memory.keep_cache_memory(200 * 2**20)
        print(default, faults_of_last_round(), kept)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    default, reused, kept = map(int, out.stdout.split())
    if kept == 0:
        pytest.skip("not glibc: the allocator keeps its own policy")
    pages = 200 * 2**20 // 4096
    assert default > pages // 2  # the defaults really gave the memory back (else this proves nothing)
    assert reused < pages // 50
