"""Every hook fires on an image forward and moves the logits when its value is changed."""

import pytest
import torch
from transformer_lens import utilities

from vlm_lens import HookedVLM
from vlm_lens.architectures.llava.testing import save_llava, tiny_llava_config
from vlm_lens.architectures.llava_next.testing import (
    PROMPTS,
    SIZES,
    image,
    save_model,
    tiny_next_config,
    tiny_onevision_config,
)
from vlm_lens.architectures.qwen2_5_vl import testing as factories_qwen
from vlm_lens.testing import assert_hooks_live, image_prompt_tokens, random_pixels


@pytest.fixture(scope="module")
def mha_model(tmp_path_factory):
    """Multi-head (not grouped) attention, so every optional TransformerLens hook can be switched on."""
    config = tiny_llava_config("llama")
    config.text_config.num_key_value_heads = config.text_config.num_attention_heads
    path, _ = save_llava(tmp_path_factory.mktemp("mha"), config)
    model = HookedVLM.from_pretrained_no_processing(str(path))
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    return model


def _check_all_hooks_live(model, names, inputs=None):
    """``inputs``: a VLMInputs; by default two LLaVA-1.5 prompts with random pixels."""
    if inputs is None:
        tokens = image_prompt_tokens(model.vlm_cfg.n_image_tokens, batch=2)
        assert_hooks_live(model, names, tokens, pixel_values=random_pixels(2))
    else:
        assert_hooks_live(model, names, inputs)


def test_every_registered_hook_fires_and_matters(mha_model):
    # hook_attn_in needs the input split per head, which TL does not allow together with split_qkv_input;
    # it is checked separately below.
    names = [n for n in mha_model.hook_dict if not n.endswith("hook_attn_in")]
    assert any(n.startswith("vision.blocks.") for n in names)
    for required in ("vision.hook_patch_embed", "vision.hook_pos_embed", "vision.ln_pre.hook_normalized",
                     "hook_image_features", "projector.hook_in", "projector.hook_hidden",
                     "projector.hook_out", "hook_image_embeds", "hook_embed"):
        assert required in names
    _check_all_hooks_live(mha_model, names)


def test_attn_in_hooks_live(mha_model):
    mha_model.set_use_split_qkv_input(False)
    mha_model.set_use_attn_in(True)
    try:
        names = [n for n in mha_model.hook_dict if n.endswith("hook_attn_in")]
        assert len(names) == mha_model.cfg.n_layers + len(mha_model.vision.blocks)
        _check_all_hooks_live(mha_model, names)
    finally:
        mha_model.set_use_attn_in(False)
        mha_model.set_use_split_qkv_input(True)


def test_gqa_model_hooks_live(raw_model):
    raw_model.set_use_attn_result(True)
    try:
        names = [n for n in raw_model.hook_dict if not n.endswith(("attn_in", "_input", "mlp_in"))]
        _check_all_hooks_live(raw_model, names)
    finally:
        raw_model.set_use_attn_result(False)


def test_transformer_lens_utilities(raw_model):
    tokens = image_prompt_tokens(raw_model.vlm_cfg.n_image_tokens)
    pixels = random_pixels(1)
    with torch.no_grad():
        logits, cache = raw_model.run_with_cache(tokens, pixel_values=pixels)
    assert utilities.get_act_name("resid_post", 1) in cache
    resid, labels = cache.accumulated_resid(return_labels=True)
    assert resid.shape[0] == raw_model.cfg.n_layers + 1 and len(labels) == resid.shape[0]
    assert torch.allclose(resid[-1], cache["blocks.1.hook_resid_post"])
    parts = cache.decompose_resid(return_labels=False)
    assert torch.allclose(parts.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-4)
    assert raw_model.W_U.shape == (raw_model.cfg.d_model, raw_model.cfg.d_vocab)
    ov = raw_model.OV
    assert ov.shape[:2] == (raw_model.cfg.n_layers, raw_model.cfg.n_heads)


def test_names_filter_keeps_only_requested(raw_model):
    tokens = image_prompt_tokens(raw_model.vlm_cfg.n_image_tokens)
    with torch.no_grad():
        _, cache = raw_model.run_with_cache(tokens, pixel_values=random_pixels(1),
                                            names_filter=lambda n: n.endswith("resid_post"))
    assert set(cache.keys()) == {f"blocks.{i}.hook_resid_post" for i in range(raw_model.cfg.n_layers)} | {
        f"vision.blocks.{i}.hook_resid_post" for i in range(len(raw_model.vision.blocks))}


def test_image_embeds_hook_edits_reach_logits_only_after_image(raw_model):
    tokens = image_prompt_tokens(raw_model.vlm_cfg.n_image_tokens)
    pixels = random_pixels(1)
    first_image_pos = int((tokens[0] == raw_model.image_token_id).nonzero()[0])
    with torch.no_grad():
        base = raw_model(tokens, pixel_values=pixels)
        zeroed = raw_model.run_with_hooks(tokens, pixel_values=pixels,
                                          fwd_hooks=[("hook_image_embeds", lambda v, hook: v * 0)])
    assert torch.allclose(base[:, :first_image_pos], zeroed[:, :first_image_pos], atol=1e-6)
    assert not torch.allclose(base[:, first_image_pos:], zeroed[:, first_image_pos:], atol=1e-4)


ANYRES = {  # two-layer towers keep the hook count (one forward each) small
    "llava-next": lambda: tiny_next_config("clip", "llama", vision={"num_hidden_layers": 2}, vision_feature_layer=-1),
    "llava-onevision": lambda: tiny_onevision_config("siglip", "qwen2", vision={"num_hidden_layers": 2}),
}


@pytest.mark.parametrize("arch", list(ANYRES))
def test_anyres_model_hooks_live(tmp_path, arch):
    """LLaVA-NeXT (CLIP tower, Llama) and LLaVA-OneVision (SigLIP tower, Qwen2) on a batch of two tiled
    images of different sizes, with every optional hook but ``hook_attn_in`` switched on."""
    config = ANYRES[arch]()
    config.text_config.num_key_value_heads = config.text_config.num_attention_heads
    path, _ = save_model(tmp_path, config)
    model = HookedVLM.from_pretrained_no_processing(str(path))
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
    assert {"hook_image_features", "projector.hook_out", "hook_image_embeds", "vision.hook_patch_embed"} <= set(names)
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 0)], [image(SIZES["square"], 1)]])
    _check_all_hooks_live(model, names, inputs)


@pytest.fixture(scope="module")
def qwen_model(tmp_path_factory):
    path, _ = factories_qwen.save_qwen(tmp_path_factory.mktemp("qwen-hooks"))
    return HookedVLM.from_pretrained_no_processing(str(path))


def test_qwen2_5_vl_hooks_live(qwen_model):
    """Qwen2.5-VL (windowed 2-D-rotary tower, patch merger, M-RoPE Qwen2 LM with grouped-query attention) on
    two images of different sizes, with every optional hook switched on. ``hook_attn_in`` goes on its own and
    in the vision tower only: TransformerLens refuses it for grouped-query attention (the Qwen2 LM)."""
    model, fq = qwen_model, factories_qwen
    inputs = model.prepare(fq.PROMPTS, images=[[fq.image(fq.SIZES["wide"], 0)], [fq.image(fq.SIZES["tall"], 1)]])
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    try:
        model.set_use_split_qkv_input(True)
        names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
        assert {"vision.hook_patch_embed", "vision.blocks.1.attn.hook_rot_k", "vision.blocks.0.mlp.hook_pre_linear",
                "hook_image_features", "projector.hook_in", "projector.ln_q.hook_normalized", "projector.hook_hidden",
                "projector.hook_out", "hook_image_embeds", "blocks.0.attn.hook_rot_q"} <= set(names)
        _check_all_hooks_live(model, names, inputs)
        model.set_use_split_qkv_input(False)
        model.vision.cfg.use_attn_in = True
        names = [n for n in model.hook_dict if n.startswith("vision.") and n.endswith("hook_attn_in")]
        assert len(names) == len(model.vision.blocks)
        _check_all_hooks_live(model, names, inputs)
    finally:
        model.vision.cfg.use_attn_in = False
        for switch in (model.set_use_attn_result, model.set_use_hook_mlp_in, model.set_use_split_qkv_input):
            switch(False)
