import pytest

from vlm_lens import organism

from .common import extract_args


@pytest.fixture(scope="session")
def model():
    if not (organism.path() / "config.json").exists():
        pytest.skip(f"no organism weights in {organism.path()}")
    return organism.load()


@pytest.fixture(scope="session")
def reference(model, tmp_path_factory):
    """An uninterrupted one-process run of the resume/torchrun arguments (``common.extract_args``)."""
    from vlm_lens import activations

    out = tmp_path_factory.mktemp("reference") / "acts"
    activations.extract(model, **extract_args(out))
    return out

