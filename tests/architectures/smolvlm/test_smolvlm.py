"""SmolVLM (Idefics3's architecture under its own classes, here with tied embeddings and a tokenizer without BOS):
loading a checkpoint saved as on the hub (its processor wants torchvision and num2words), parity with
SmolVLMForConditionalGeneration stage by stage, processed weights and generation."""

import json

import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.architectures.idefics3.processor import SmolVLMImagesOnlyProcessor
from vlm_lens.architectures.idefics3.testing import (
    ATOL,
    PROMPTS,
    SIZES,
    hf_inputs,
    image,
    save_model,
    tiny_config,
)
from vlm_lens.testing import real_positions as real


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("smolvlm"), tiny_config(smolvlm=True), seed=1)


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare(["USER : <image> <image> what is this ? ASSISTANT :", PROMPTS[1]],
                         images=[[image(SIZES["tall"], 0), image(SIZES["square"], 1)], [image(SIZES["wide"], 2)]])


def test_hub_folder_loads_with_the_images_only_processor(saved, model, batch):
    path, _ = saved
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "SmolVLMProcessor"
    assert (path / "video_preprocessor_config.json").exists()
    assert isinstance(model.processor, SmolVLMImagesOnlyProcessor) and model.vlm_cfg.architecture.startswith("SmolVLM")
    assert not model.cfg.tokenizer_prepends_bos and batch.extras["tile_grid"].tolist() == [[2, 1], [2, 2], [1, 2]]
    # a flat list of images for two prompts is regrouped by their placeholders
    flat = model.processor(text=PROMPTS, images=[image(SIZES["wide"], 3), image(SIZES["tall"], 4)],
                           return_tensors="pt", padding=True)
    assert flat["pixel_values"].shape[:2] == (2, 3)


def test_parity_stage_by_stage(model, saved, batch):
    hf = saved[1]
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        embeds = torch.cat(hf.model.get_image_features(batch.pixel_values, batch.extras["pixel_attention_mask"]
                                                       ).pooler_output)
        logits, cache = model.run_with_cache(batch)
    assert (cache["hook_image_embeds"].flatten(0, 1) - embeds).abs().max() <= ATOL
    assert real(cache["hook_embed"] - ref.hidden_states[0], batch).abs().max() <= ATOL
    for layer in range(model.cfg.n_layers - 1):
        assert real(cache[f"blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1], batch).abs().max() <= ATOL
    assert real(logits - ref.logits, batch).abs().max() <= ATOL


def test_processed_weights_and_generation(saved, model, batch):
    path, hf = saved
    processed = HookedVLM.from_pretrained(str(path))
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        assert real(processed(batch).log_softmax(-1) - ref, batch).abs().max() <= ATOL
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        expected = hf.generate(**hf_inputs(batch, padded=False), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(batch, max_new_tokens=4, stop_at_eos=False), expected)


def test_chat_template_without_the_video_processor(model):
    inputs = model.prepare("what is this ?", images=[image(SIZES["wide"], 5)], chat=True)
    text = model.tokenizer.decode(inputs.tokens[0])
    assert text.startswith("USER : <fake_token_around_image> <row_1_col_1>") and text.endswith("ASSISTANT :")
    with pytest.raises(ValueError, match="videos are not supported"):
        model.processor(text=PROMPTS[0], videos=[torch.zeros(2, 3, 16, 16)])
