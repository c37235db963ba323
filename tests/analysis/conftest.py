import numpy as np
import pytest
from PIL import Image

PROMPT = "USER : <image>\nwhat is this ? ASSISTANT :"


def make_image(seed, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture()
def one(raw_model):
    return raw_model.prepare(PROMPT, images=[make_image(0)])


@pytest.fixture()
def two(raw_model):
    return raw_model.prepare([PROMPT, "USER : <image>\ndescribe ASSISTANT :"], images=[[make_image(1)], [make_image(2)]])
