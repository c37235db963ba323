"""HookedVLM equals LlavaForConditionalGeneration, stage by stage, across LLaVA variants."""

import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.architectures.llava.testing import save_llava, tiny_llava_config
from vlm_lens.testing import image_prompt_tokens, random_pixels

ATOL = 1e-4

VARIANTS = {
    "llama-gqa": dict(lm="llama"),
    "llama-mha": dict(lm="llama", text_overrides=dict(num_key_value_heads=4)),
    "mistral": dict(lm="mistral"),
    "qwen2-qkv-bias": dict(lm="qwen2"),
    # windows shorter than the prompt: every layer (Mistral), the layers from max_window_layers on (Qwen2)
    "mistral-sliding": dict(lm="mistral", text_overrides=dict(sliding_window=4)),
    "qwen2-sliding-upper": dict(lm="qwen2", text_overrides=dict(
        use_sliding_window=True, sliding_window=4, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"])),
    "projector-no-bias": dict(lm="llama", multimodal_projector_bias=False),
    "feature-layer-last": dict(lm="llama", vision_feature_layer=-1),
    "feature-layer-list": dict(lm="llama", vision_feature_layer=[0, -3, -1]),
    "strategy-full": dict(lm="llama", vision_feature_select_strategy="full"),
}


def build_variant(tmp_path, spec):
    spec = dict(spec)
    lm = spec.pop("lm")
    text_overrides = spec.pop("text_overrides", None)
    config = tiny_llava_config(lm, **spec)
    if text_overrides:
        for k, v in text_overrides.items():
            setattr(config.text_config, k, v)
    path, hf = save_llava(tmp_path, config)
    return path, hf


def hf_reference(hf, tokens, pixels):
    cfg = hf.config
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=pixels, output_hidden_states=True)
        vision = hf.model.vision_tower(pixels, output_hidden_states=True)
        layers = [cfg.vision_feature_layer] if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer
        feats = [vision.hidden_states[i] for i in layers]
        if cfg.vision_feature_select_strategy == "default":
            feats = [f[:, 1:] for f in feats]
        feats = torch.cat(feats, dim=-1)
        embeds = hf.model.multi_modal_projector(feats)
    return out, feats, embeds


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_stage_by_stage(tmp_path, variant):
    path, hf = build_variant(tmp_path, VARIANTS[variant])
    model = HookedVLM.from_pretrained_no_processing(str(path))
    n_img = model.vlm_cfg.n_image_tokens
    tokens = image_prompt_tokens(n_img, batch=2, seed=1)
    pixels = random_pixels(2, seed=2)  # two different images
    ref, ref_feats, ref_embeds = hf_reference(hf, tokens, pixels)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, pixel_values=pixels)
    assert (cache["hook_image_features"] - ref_feats).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - ref_embeds).abs().max() <= ATOL
    assert (cache["hook_embed"] - ref.hidden_states[0]).abs().max() <= ATOL
    n_layers = model.cfg.n_layers
    for layer in range(n_layers - 1):
        diff = (cache[f"blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1]).abs().max()
        assert diff <= ATOL, (layer, diff)
    # HF's last hidden state is after the final norm.
    last = model.ln_final(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    assert (last - ref.hidden_states[-1]).abs().max() <= ATOL
    assert (logits - ref.logits).abs().max() <= ATOL


@pytest.mark.parametrize("variant", ["mistral-sliding", "qwen2-sliding-upper"])
def test_sliding_windows_on_a_padded_batch_and_in_generation(tmp_path, variant):
    path, hf = build_variant(tmp_path, VARIANTS[variant])
    model = HookedVLM.from_pretrained_no_processing(str(path))
    assert [b.attn.attn_type for b in model.blocks] == (
        ["local", "local"] if variant.startswith("mistral") else ["global", "local"])
    tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens, batch=2, seed=5)
    mask = torch.ones_like(tokens)
    tokens[1, :3], mask[1, :3] = 0, 0  # row 1 left-padded
    pixels = random_pixels(2, seed=6)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels, attention_mask=mask,
                 position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        ours = model(tokens, pixel_values=pixels, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= ATOL
    new = model.generate(tokens, max_new_tokens=6, pixel_values=pixels, attention_mask=mask, stop_at_eos=False)
    with torch.no_grad():
        expected = hf.generate(input_ids=tokens, pixel_values=pixels, attention_mask=mask, max_new_tokens=6,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(new, expected)


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-qkv-bias", "mistral-sliding"])
def test_processed_weights_match_log_probs(tmp_path, variant):
    path, hf = build_variant(tmp_path, VARIANTS[variant])
    model = HookedVLM.from_pretrained(str(path))
    assert model.cfg.normalization_type == "RMSPre"
    tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens, batch=2, seed=3)
    pixels = random_pixels(2, seed=4)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pixels).logits.log_softmax(-1)
        ours = model(tokens, pixel_values=pixels).log_softmax(-1)
    assert (ours - ref).abs().max() <= ATOL
    # center_unembed really happened: W_U has zero mean over the vocabulary.
    assert model.W_U.mean(-1).abs().max() < 1e-5


def test_vision_layers_after_deepest_feature_layer_are_not_built(raw_model):
    # tiny config: 3 layers, feature layer -2 -> hidden state 2 -> two blocks run.
    assert len(raw_model.vision.blocks) == 2
    assert not any(name.startswith("vision.blocks.2.") for name in raw_model.hook_dict)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_loads_and_runs(llava_dir, hf_llava, dtype):
    model = HookedVLM.from_pretrained_no_processing(str(llava_dir), dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens)
    pixels = random_pixels(1)
    with torch.no_grad():
        ours = model(tokens, pixel_values=pixels).float()
        ref = hf_llava(input_ids=tokens, pixel_values=pixels).logits
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() < 0.1  # loose: half precision end to end


def test_from_hf_in_memory(hf_llava):
    model = HookedVLM.from_hf(hf_llava)
    tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens)
    pixels = random_pixels(1, seed=5)
    with torch.no_grad():
        assert (model(tokens, pixel_values=pixels) - hf_llava(input_ids=tokens, pixel_values=pixels).logits).abs().max() <= ATOL
    # the HF model is untouched and still usable
    assert hf_llava.lm_head.weight.dtype == torch.float32
