"""The TransformerLens version check and the choice between the fast path and TransformerLens's own."""

import re
from pathlib import Path

import pytest
import tomllib
import torch
from transformer_lens.components import GroupedQueryAttention, TransformerBlock

from vlm_lens import HookedVLM, _tl
from vlm_lens._tl.fast import FAST_CLASSES
from vlm_lens.testing import image_prompt_tokens, random_pixels


def test_pyproject_pins_the_tested_range():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("transformer-lens"))
    low, high = ((tuple(int(x) for x in v.split(".")) + (0,))[:2] for v in re.findall(r"[<>]=?([\d.]+)", pin))
    assert (low, high) == _tl.TESTED_RANGE


@pytest.mark.parametrize("version, inside", [("3.9.0", True), ("3.9.5.dev1", True), ("3.8.2", False),
                                             ("4.0.0", False), ("4.1.0rc1", False)])
def test_version_range(version, inside):
    assert _tl.in_tested_range(version) is inside


def test_outside_the_range_the_default_is_transformer_lens_own_and_fast_is_refused(monkeypatch):
    monkeypatch.setattr(_tl, "_IN_RANGE", False)
    assert _tl.resolve_fast(None) is False and _tl.resolve_fast(False) is False
    with pytest.raises(ValueError, match="fast=False"):
        _tl.resolve_fast(True)


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(_tl.FAST_ENV, "0")
    assert _tl.resolve_fast(None) is False
    monkeypatch.setenv(_tl.FAST_ENV, "1")
    assert _tl.resolve_fast(None) is _tl.default_fast()


def test_fast_false_keeps_transformer_lens_classes_and_the_same_logits(llava_dir):
    slow = HookedVLM.from_pretrained_no_processing(str(llava_dir), fast=False)
    fast = HookedVLM.from_pretrained_no_processing(str(llava_dir), fast=True)
    assert not slow.fast and fast.fast
    fast_types = set(FAST_CLASSES.values())
    assert not any(type(m) in fast_types for m in slow.modules())
    assert type(slow.blocks[0].attn) is GroupedQueryAttention and type(slow.blocks[0]) is TransformerBlock
    assert any(type(m) in fast_types for m in fast.modules())
    tokens, pixels = image_prompt_tokens(slow.vlm_cfg.n_image_tokens, batch=2), random_pixels(2)
    with torch.no_grad():
        assert (slow(tokens, pixel_values=pixels) - fast(tokens, pixel_values=pixels)).abs().max() < 1e-5
