"""The shipped ``scenes`` organism: LLaVA-1.5-shaped, small, equal to HF through HookedVLM, and at least 95 %
right on held-out items of every question type (the issue's floor)."""

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vlm_lens import analysis, organism
from vlm_lens.organism import build, sanity, scenes

PER_TYPE_FLOOR = 0.95
N_PER_TYPE = 40


# The acceptance checks of the scenes organism; they run once its weights ship (not yet: see
# vlm_lens/organism/README.md, "The scenes organism").
pytestmark = pytest.mark.skipif(
    not (organism.path("scenes") / "model.safetensors").exists(),
    reason="the scenes organism's weights do not ship yet (`python -m vlm_lens.organism.train --organism scenes`)",
)


@pytest.fixture(scope="module")
def folder():
    return organism.path("scenes")


@pytest.fixture(scope="module")
def hf(folder):
    return LlavaForConditionalGeneration.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def model():
    return organism.load(name="scenes")


@pytest.fixture(scope="module")
def items():
    return list(organism.ShapesDataset("test", 3, N_PER_TYPE * len(scenes.QUESTION_TYPES), organism="scenes"))


def test_folder_is_small_and_shaped_as_the_issue_asks(folder, hf):
    model, processor = hf
    assert sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) <= 20e6
    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert grid >= 8 and cfg.image_seq_length == grid * grid
    assert cfg.text_config.num_hidden_layers >= 8
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # grouped-query attention
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert processor.patch_size == cfg.vision_config.patch_size
    vocab = set(processor.tokenizer.get_vocab())
    assert vocab >= {*scenes.SHAPES, *scenes.COLOURS, *scenes.NUMBERS}


def test_processor_matches_training_encoding(hf, items):
    _, processor = hf
    slow, fast = build.encode(processor, items[:8]), build.encode_fast(processor, items[:8])
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(slow[key], fast[key]), key
    torch.testing.assert_close(slow["pixel_values"], fast["pixel_values"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_hooked_logits_equal_hf_on_a_padded_batch(hf, model, items):
    hf_model, processor = hf
    batch = items[:6]  # the prompts differ in length, so the batch is padded
    enc = processor(text=[it.prompt for it in batch], images=[it.image for it in batch], return_tensors="pt",
                    padding=True)
    assert not bool(enc["attention_mask"].all())
    expected = hf_model(**enc).logits
    inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
    got = model(inputs)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def test_accuracy_per_question_type_through_hooked_vlm(model, items):
    by_type = sanity.accuracy_by_type(items, analysis.evaluate(model, items).correct.numpy())
    assert set(by_type) >= set(scenes.QUESTION_TYPES)
    low = {kind: acc for kind, acc in by_type.items() if acc < PER_TYPE_FLOOR}
    assert not low, f"below {PER_TYPE_FLOOR:.0%} on {low}"


@torch.no_grad()
def test_generate_writes_the_description_and_equals_hf(hf, model, items):
    hf_model, processor = hf
    describe = [it for it in items if it.question_type == "describe"][:4]
    for item in describe:
        enc = processor(text=item.prompt, images=[item.image], return_tensors="pt")
        ours = model.generate(model.prepare(item.prompt, images=[item.image]), max_new_tokens=3,
                              return_type="new_tokens")
        theirs = hf_model.generate(**enc, max_new_tokens=3, do_sample=False)
        new = theirs[0, enc["input_ids"].shape[1]:]
        assert processor.tokenizer.decode(new, skip_special_tokens=True).strip() == item.answer
        assert ours[0, : len(new)].tolist() == new.tolist()
