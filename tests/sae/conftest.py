import os

import pytest

try:
    import vlm_lens.sae  # noqa: F401  (imports sae_lens)
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs .[dev], which includes sae-lens
    pytest.skip("sae-lens is not installed (pip install -e '.[sae]')", allow_module_level=True)

from sae_helpers import PROMPTS, rgb  # noqa: E402


@pytest.fixture(scope="session")
def sae_model(llava_dir):
    from vlm_lens.sae import HookedSAEVLM

    return HookedSAEVLM.from_pretrained_no_processing(str(llava_dir))


@pytest.fixture(scope="session")
def tiny_inputs(sae_model):
    return sae_model.prepare(PROMPTS, images=[[rgb(0)], [rgb(1)]])


@pytest.fixture(autouse=True)
def no_saes_left(request):
    """Every test starts and ends with no SAE attached to the shared model."""
    yield
    if "sae_model" in request.fixturenames:
        model = request.getfixturevalue("sae_model")
        assert not model.acts_to_saes, f"a test left SAEs attached: {list(model.acts_to_saes)}"
