"""generate() with images equals HF greedy generation, with and without the KV cache."""

import numpy as np
import pytest
import torch
from PIL import Image


def img(seed, size=20):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def batch(raw_model):
    prompts = ["USER : <image>\nwhat is this ? ASSISTANT :", "USER : <image>\ndescribe ASSISTANT :"]
    return raw_model.prepare(prompts, images=[[img(0)], [img(1)]])


def hf_generate(hf, inputs, n):
    with torch.no_grad():
        return hf.generate(input_ids=inputs.tokens, pixel_values=inputs.pixel_values,
                           attention_mask=inputs.attention_mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=2)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf(raw_model, hf_llava, batch, use_cache):
    ours = raw_model.generate(batch, max_new_tokens=10, use_past_kv_cache=use_cache)
    ref = hf_generate(hf_llava, batch, 10)
    assert torch.equal(ours, ref)


def test_vision_runs_once_and_hooks_fire_every_step(raw_model, batch):
    calls = {"vision": 0, "resid": 0}

    def count(name):
        def hook(value, hook):
            calls[name] += 1
        return hook

    out = raw_model.generate(batch, max_new_tokens=5, stop_at_eos=False, fwd_hooks=[
        ("vision.hook_patch_embed", count("vision")), ("blocks.0.hook_resid_pre", count("resid"))])
    assert out.shape[1] == batch.tokens.shape[1] + 5
    assert calls == {"vision": 1, "resid": 5}
    assert all(not hp._forward_hooks for hp in raw_model.hook_dict.values())


def test_hooks_context_applies_to_generation(raw_model, batch):
    base = raw_model.generate(batch, max_new_tokens=4, stop_at_eos=False, return_type="new_tokens")
    with raw_model.hooks(fwd_hooks=[("hook_image_embeds", lambda v, hook: v * 0)]):
        ablated = raw_model.generate(batch, max_new_tokens=4, stop_at_eos=False, return_type="new_tokens")
    assert base.shape == ablated.shape == (2, 4)
    with torch.no_grad():
        logits = raw_model(batch)
        zeroed = raw_model.run_with_hooks(batch, fwd_hooks=[("hook_image_embeds", lambda v, hook: v * 0)])
    # the first generated token is the argmax of the (possibly ablated) prefill logits
    assert torch.equal(base[:, 0], logits[:, -1].argmax(-1))
    assert torch.equal(ablated[:, 0], zeroed[:, -1].argmax(-1))


def test_string_return_types(raw_model, batch):
    text = raw_model.generate(batch, max_new_tokens=3, return_type="str")
    new = raw_model.generate(batch, max_new_tokens=3, return_type="new_str")
    assert len(text) == 2 and text[0].split("ASSISTANT")[0].count("<image>") == 1  # run collapsed
    assert all(isinstance(t, str) for t in new)


def test_sampling_is_seeded(raw_model, batch):
    a = raw_model.generate(batch, max_new_tokens=5, do_sample=True, seed=3, stop_at_eos=False)
    b = raw_model.generate(batch, max_new_tokens=5, do_sample=True, seed=3, stop_at_eos=False)
    assert torch.equal(a, b)


def test_generate_rejects_missing_pixels(raw_model, batch):
    with pytest.raises(ValueError, match="no pixel_values"):
        raw_model.generate(batch.tokens, max_new_tokens=2)


@pytest.fixture(scope="module")
def two_stop_tokens(llava_dir, batch, raw_model, tmp_path_factory):
    """The tiny LLaVA with a generation_config that lists two stop tokens (as Gemma 3, Qwen2.5-VL and Llama 3.2
    Vision checkpoints do): the tokenizer's eos and the second token row 0 generates; no pad token."""
    import json
    import shutil

    second = int(raw_model.generate(batch, max_new_tokens=2, stop_at_eos=False, return_type="new_tokens")[0, 1])
    path = tmp_path_factory.mktemp("llava_stops")
    shutil.copytree(llava_dir, path, dirs_exist_ok=True)
    config = path / "generation_config.json"
    settings = json.loads(config.read_text()) if config.exists() else {}
    settings.update(eos_token_id=[2, second])
    settings.pop("pad_token_id", None)  # HF then pads finished rows with the first stop token
    config.write_text(json.dumps(settings))
    return path, second


def test_generation_stops_at_any_of_the_checkpoints_stop_tokens_as_hf(two_stop_tokens, batch):
    from transformers import LlavaForConditionalGeneration

    from vlm_lens import HookedVLM

    path, second = two_stop_tokens
    hf = LlavaForConditionalGeneration.from_pretrained(path).eval()
    model = HookedVLM.from_pretrained_no_processing(str(path))
    assert model.generation_eos_token_ids == (2, second)
    with torch.no_grad():
        ref = hf.generate(input_ids=batch.tokens, pixel_values=batch.pixel_values,
                          attention_mask=batch.attention_mask, max_new_tokens=8, do_sample=False)
    ours = model.generate(batch, max_new_tokens=8)
    assert torch.equal(ours, ref)
    assert int(ours[0, batch.tokens.shape[1] + 1]) == second  # row 0 stopped there: padded afterwards
    given = model.generate(batch, max_new_tokens=8, eos_token_id=[2, second])  # a list given by hand
    assert torch.equal(given, ref)
    longer = model.generate(batch, max_new_tokens=8, eos_token_id=2)  # the tokenizer's eos alone goes on
    assert longer.shape[1] > ref.shape[1] or not torch.equal(longer, ref)


def test_generate_from_left_padded_tokens_masks_the_padding(raw_model, hf_llava, batch):
    """Tokens without a mask: leading pad tokens are padding (TransformerLens's rule), as in VLMInputs."""
    assert batch.needs_attention_mask
    from_tokens = raw_model.generate(batch.tokens, max_new_tokens=6, pixel_values=batch.pixel_values)
    assert torch.equal(from_tokens, hf_generate(hf_llava, batch, 6))
    explicit = raw_model.generate(batch.tokens, max_new_tokens=6, pixel_values=batch.pixel_values,
                                  attention_mask=batch.attention_mask)
    assert torch.equal(explicit, from_tokens)
    with pytest.raises(ValueError, match="inside the VLMInputs"):
        raw_model.generate(batch, max_new_tokens=2, attention_mask=batch.attention_mask)


def test_generate_refuses_rows_that_end_in_padding(raw_model):
    right = raw_model.prepare(["USER : <image>\nwhat is this ? ASSISTANT :", "USER : <image>\ndescribe ASSISTANT :"],
                              images=[[img(0)], [img(1)]], padding_side="right")
    with pytest.raises(ValueError, match="pad on the left"):
        raw_model.generate(right, max_new_tokens=2)
    assert all(not hp._forward_hooks for hp in raw_model.hook_dict.values())
