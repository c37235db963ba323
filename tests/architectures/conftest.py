"""Fixtures every family's tests share: a family's test module defines ``saved`` (the folder and HF model of a tiny
seeded checkpoint saved as on the hub); ``hf`` and ``model`` (raw weights, loaded through the public loader)
follow from it. A module that needs another model overrides ``model``."""

import pytest

from vlm_lens import HookedVLM


@pytest.fixture(scope="module")
def hf(saved):
    return saved[1]


@pytest.fixture(scope="module")
def model(saved):
    return HookedVLM.from_pretrained_no_processing(str(saved[0]))
