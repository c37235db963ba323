"""Loading straight to the target device: each weight goes from the file to the device, and the host holds
at most a few of them at a time. The device here is ``meta`` (a stand-in for ``cuda`` on a CPU machine):
every tensor read from the file is watched, and the bytes still alive on the host are counted at each read.
"""

import weakref

import pytest
import torch

import vlm_lens.loading.checkpoint as checkpoint
from vlm_lens import HookedVLM
from vlm_lens.architectures.llava.testing import save_llava, tiny_llava_config


class Watched:
    """Records every CPU tensor read from the file, and the largest total still alive at any read."""

    def __init__(self):
        self.alive: list[weakref.ref] = []
        self.sizes: list[int] = []
        self.peak = 0

    def read(self, tensor: torch.Tensor) -> torch.Tensor:
        self.alive = [r for r in self.alive if r() is not None]
        self.alive.append(weakref.ref(tensor))
        self.sizes.append(tensor.numel() * tensor.element_size())
        held = sum(r().numel() * r().element_size() for r in self.alive if r() is not None)
        self.peak = max(self.peak, held)
        return tensor


class WatchedSlice:
    def __init__(self, inner, watched):
        self.inner, self.watched = inner, watched

    def __getitem__(self, index):
        return self.watched.read(self.inner[index])

    def __getattr__(self, name):
        return getattr(self.inner, name)


class WatchedHandle:
    def __init__(self, inner, watched):
        self.inner, self.watched = inner, watched

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def get_slice(self, key):
        return WatchedSlice(self.inner.get_slice(key), self.watched)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("processing", [False, True])
def test_host_holds_a_few_tensors_while_loading_to_a_device(tmp_path, monkeypatch, processing):
    path, hf = save_llava(tmp_path, tiny_llava_config())
    file_bytes = sum(p.numel() * p.element_size() for p in hf.state_dict().values())
    watched = Watched()
    real_open = checkpoint._open
    monkeypatch.setattr(checkpoint, "_open", lambda *a, **k: WatchedHandle(real_open(*a, **k), watched))
    load = HookedVLM.from_pretrained if processing else HookedVLM.from_pretrained_no_processing
    model = load(str(path), device="meta")
    assert sum(watched.sizes) >= file_bytes * 0.99  # every weight was read from the file ...
    assert watched.peak <= 4 * max(watched.sizes) < file_bytes / 2  # ... and only a few held at once
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}
