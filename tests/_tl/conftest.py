import pytest


@pytest.fixture(scope="module")
def raw_model(llava_dir):
    """The fast path explicitly, whatever VLM_LENS_FAST says: these tests compare it with TransformerLens's."""
    from vlm_lens import HookedVLM

    return HookedVLM.from_pretrained_no_processing(str(llava_dir), fast=True)
