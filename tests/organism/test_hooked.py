"""The organism through HookedVLM: equal to HF, accurate per question type, and installable."""

import subprocess
import sys
import zipfile

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlm_lens import analysis, organism


@pytest.fixture(scope="module")
def hooked():
    return organism.load()


@pytest.fixture(scope="module")
def items():
    return list(organism.ShapesDataset(split="test", seed=0, size=200))


def test_hooked_logits_equal_hf(hooked, items):
    hf = LlavaForConditionalGeneration.from_pretrained(organism.path()).eval()
    inputs = hooked.prepare([it.prompt for it in items[:32]], images=[[it.image] for it in items[:32]])
    with torch.no_grad():
        ours = hooked(inputs).log_softmax(-1)  # from_pretrained processes weights: compare log-probs
        ref = hf(input_ids=inputs.tokens, pixel_values=inputs.pixel_values,
                 attention_mask=inputs.attention_mask,
                 position_ids=(inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits.log_softmax(-1)
    real = inputs.attention_mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-4
    from vlm_lens import HookedVLM

    unprocessed = HookedVLM.from_pretrained_no_processing(str(organism.path()))
    with torch.no_grad():
        logits = unprocessed(inputs)
    assert (logits[real] - hf(input_ids=inputs.tokens, pixel_values=inputs.pixel_values,
                               attention_mask=inputs.attention_mask,
                               position_ids=(inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[real]
            ).abs().max() <= 1e-4


def test_accuracy_per_question_type_through_hooked_vlm(hooked):
    """The README's headline figures: the held-out split of 500 items, seed 0."""
    result = analysis.evaluate(hooked, list(organism.ShapesDataset(split="test", seed=0, size=500)), batch_size=100)
    print("HookedVLM held-out accuracy:", result)
    assert set(result.by_type) == set(organism.QUESTION_TYPES)
    assert all(acc >= 0.95 for acc in result.by_type.values()), result.by_type


def test_weights_ship_in_the_wheel(tmp_path):
    root = organism.path().parents[2]
    if not (root / "pyproject.toml").exists():
        pytest.skip("not running from a source tree")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True)
    wheel = next(tmp_path.glob("vlm_lens-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        for folder in ("weights", "weights_scenes"):  # both shipped organisms
            assert f"vlm_lens/organism/{folder}/{f}" in names
