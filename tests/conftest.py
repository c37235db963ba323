import pytest
import torch

from vlm_lens.architectures.llava.testing import save_llava, tiny_llava_config

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory):
    """A tiny seeded LLaVA (Llama LM with GQA) saved with its processor."""
    path, _ = save_llava(tmp_path_factory.mktemp("llava"), tiny_llava_config())
    return path


@pytest.fixture(scope="session")
def hf_llava(llava_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()


@pytest.fixture(scope="session")
def raw_model(llava_dir):
    from vlm_lens import HookedVLM

    return HookedVLM.from_pretrained_no_processing(str(llava_dir))
