"""Gradients with respect to the pixels equal HF's where a call's images have different sizes: towers that
pad them to one length (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Pixtral) once gave NaN there, from padding rows
that attended to nothing (their forward values were right)."""

import importlib

import pytest
import torch

from vlm_lens import HookedVLM, VLMInputs
from vlm_lens.testing import seeded_image

FAMILIES = {"qwen2_vl": "save_qwen2_vl", "qwen2_5_vl": "save_qwen", "qwen3_vl": "save_qwen3",
            "pixtral": "save_mistral3"}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixel_gradients_equal_hf_with_images_of_two_sizes(tmp_path, family):
    testing = importlib.import_module(f"vlm_lens.architectures.{family}.testing")
    path, hf = getattr(testing, FAMILIES[family])(tmp_path)
    hf = hf.float().eval()
    model = HookedVLM.from_pretrained_no_processing(str(path))
    placeholder = model.processor.image_token
    inputs = model.prepare(f"USER : {placeholder} and {placeholder} what is this ? ASSISTANT :",
                           images=[seeded_image((16, 16), 0), seeded_image((40, 24), 1)])
    theirs = inputs.pixel_values.clone().requires_grad_(True)
    hf(**{**testing.hf_inputs(inputs), "pixel_values": theirs}).logits[0, -1].logsumexp(-1).backward()
    ours = inputs.pixel_values.clone().requires_grad_(True)
    model(VLMInputs(**{**inputs.__dict__, "pixel_values": ours}))[0, -1].logsumexp(-1).backward()
    assert torch.isfinite(ours.grad).all()
    assert (ours.grad - theirs.grad).abs().max() <= 1e-4 * theirs.grad.abs().max()
