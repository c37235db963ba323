import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")

PROMPT = "USER : <image>\nwhat is this ? ASSISTANT :"


def rgb(seed: int, height: int = 16, width: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def make_image():
    """A seeded random RGB image: make_image(seed, height=16, width=16)."""
    return rgb


@pytest.fixture(scope="module")
def inputs(raw_model):
    return raw_model.prepare(PROMPT, images=[rgb(0)])


@pytest.fixture(scope="module")
def cache(raw_model, inputs):
    _, cache = raw_model.run_with_cache(inputs)
    return cache
