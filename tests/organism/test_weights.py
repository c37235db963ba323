"""The shipped organism folder loads with plain transformers and answers held-out items.

The accuracy floors below are the shipped model's measured level minus a margin (see
vlm_lens/organism/README.md); raise them when better weights are shipped.
"""

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm_lens import organism
from vlm_lens.organism import build, sanity

ONE_OBJECT_FLOOR = 0.95  # with one object every question type is answerable without binding
OVERALL_FLOOR = 0.95


@pytest.fixture(scope="module")
def shipped():
    folder = organism.path()
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"no weights in {folder}; run `python -m vlm_lens.organism.train --out {folder}`")
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    return model.eval(), AutoProcessor.from_pretrained(folder)


def test_folder_is_small_and_llava_15_shaped(shipped):
    model, processor = shipped
    size = sum(f.stat().st_size for f in organism.path().iterdir() if f.is_file())
    assert size <= 20e6
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.projector_hidden_act == "gelu" and cfg.vision_config.hidden_act == "quick_gelu"
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert processor.patch_size == cfg.vision_config.patch_size


def test_processor_matches_training_encoding(shipped):
    _, processor = shipped
    items = list(organism.ShapesDataset(split="test", seed=0, size=8))
    slow, fast = build.encode(processor, items), build.encode_fast(processor, items)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(slow[key], fast[key]), key
    torch.testing.assert_close(slow["pixel_values"], fast["pixel_values"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_answers_one_object_items_one_by_one(shipped):
    model, processor = shipped
    tok = processor.tokenizer
    items = list(organism.ShapesDataset(split="test", seed=0, size=24, n_objects=1))
    correct = 0
    for item in items:
        inputs = processor(text=item.prompt, images=[item.image], return_tensors="pt")
        logits = model(**inputs).logits[0, -1]
        correct += tok.convert_ids_to_tokens(int(logits.argmax())) == item.answer
    assert correct / len(items) >= ONE_OBJECT_FLOOR


def test_batched_accuracy_on_held_out_items(shipped):
    model, processor = shipped
    items = list(organism.ShapesDataset(split="test", seed=0, size=80))
    assert sanity.predictions(model, processor, items).mean() >= OVERALL_FLOOR
