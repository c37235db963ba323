"""Bad input gets a ValueError that names the problem, and leaves the model as it was."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_lens import HookedVLM
from vlm_lens.architectures.llava.testing import save_llava, tiny_llava_config
from vlm_lens.inputs import inputs_from_tokens
from vlm_lens.testing import IMAGE_TOKEN_ID, image_prompt_tokens, random_pixels


@pytest.fixture()
def good_call(raw_model):
    tokens = image_prompt_tokens(raw_model.vlm_cfg.n_image_tokens)
    pixels = random_pixels(1)
    with torch.no_grad():
        base = raw_model(tokens, pixel_values=pixels)
    return tokens, pixels, base


def _n_hooks(model):
    return sum(len(hp._forward_hooks) + len(hp._backward_hooks) for hp in model.hook_dict.values())


BAD_CALLS = {
    "image tokens but no pixel_values": (lambda t, p: (t, None), "no pixel_values"),
    "pixel_values but no image tokens": (lambda t, p: (torch.where(t == IMAGE_TOKEN_ID, 7, t), p), "no image token"),
    "too few image tokens": (lambda t, p: (t[:, :-6].clone().index_fill_(1, torch.tensor([4]), 9), p), "image features"),
    "two images for one image's tokens": (lambda t, p: (t, torch.cat([p, p])), "image features"),
    "wrong channel count": (lambda t, p: (t, p[:, :1]), "channels"),
    "wrong image size": (lambda t, p: (t, p[..., :8, :8]), "shape"),
    "pixels not 4-d": (lambda t, p: (t, p[0]), "shape"),
}


@pytest.mark.parametrize("as_inputs", [False, True])
def test_start_at_layer_with_tokens_names_what_it_takes(raw_model, good_call, as_inputs):
    tokens, pixels, base = good_call
    given = inputs_from_tokens(raw_model, tokens, pixels) if as_inputs else tokens
    with pytest.raises(ValueError, match="residual stream entering block"):
        raw_model.run_with_hooks(given, start_at_layer=1, fwd_hooks=[("hook_embed", lambda v, hook: None)])
    assert _n_hooks(raw_model) == 0
    with torch.no_grad():
        assert torch.equal(raw_model(tokens, pixel_values=pixels), base)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_inputs_raise_and_leave_no_hooks(raw_model, good_call, case):
    tokens, pixels, base = good_call
    make, words = BAD_CALLS[case]
    bad_tokens, bad_pixels = make(tokens.clone(), pixels.clone())
    fired = []
    with pytest.raises(ValueError, match=words):
        raw_model.run_with_hooks(bad_tokens, pixel_values=bad_pixels,
                                 fwd_hooks=[("hook_embed", lambda v, hook: fired.append(1))])
    assert _n_hooks(raw_model) == 0
    assert not fired  # validation happens before anything runs
    with torch.no_grad():
        assert torch.equal(raw_model(tokens, pixel_values=pixels), base)


def test_unsupported_architecture_lists_supported(tmp_path):
    path, _ = save_llava(tmp_path, tiny_llava_config())
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["Blip2ForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration"):
        HookedVLM.from_pretrained(str(path))


def test_checkpoint_with_missing_weights_is_rejected(tmp_path):
    path, _ = save_llava(tmp_path, tiny_llava_config())
    weights = load_file(path / "model.safetensors")
    dropped = [k for k in weights if "layers.1.self_attn.k_proj" in k]
    assert dropped
    save_file({k: v for k, v in weights.items() if k not in dropped}, path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj"):
        HookedVLM.from_pretrained(str(path))


def test_pickle_checkpoints_need_explicit_flag(tmp_path):
    path, hf = save_llava(tmp_path, tiny_llava_config())
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_pickle"):
        HookedVLM.from_pretrained(str(path))


def test_unknown_language_model_rejected(tmp_path):
    from transformers import GPT2Config

    config = tiny_llava_config()
    config.text_config = GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=48)
    from vlm_lens.architectures.llava.config import llava_configs

    with pytest.raises(ValueError, match="llama"):
        llava_configs(config, torch.float32, "cpu")


def test_strict_key_check_names_the_difference():
    from vlm_lens.architectures.checks import require_exact_keys

    with pytest.raises(ValueError, match=r"(?s)missing \(1\): b.*unexpected \(1\): c"):
        require_exact_keys({"a", "c"}, {"a", "b"}, "thing")


def test_checkpoint_with_an_extra_weight_is_rejected(tmp_path):
    path, _ = save_llava(tmp_path, tiny_llava_config())
    weights = load_file(path / "model.safetensors")
    weights["language_model.model.layers.0.mlp.surprise.weight"] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="surprise"):
        HookedVLM.from_pretrained(str(path))


def test_checkpoint_with_a_misshaped_weight_is_rejected(tmp_path):
    path, _ = save_llava(tmp_path, tiny_llava_config())
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.self_attn.q_proj.weight"))
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj\.weight: checkpoint \(33, 32\) vs config \(32, 32\)"):
        HookedVLM.from_pretrained(str(path))
