"""HookedVLM equals Qwen2VLForConditionalGeneration: vision blocks, merger, 3-D positions, every residual,
logits and greedy generation; hooks, layout, errors and the analysis toolkit on a tiny seeded model loaded
from a folder laid out as on the hub."""

import json

import einops
import numpy as np
import pytest
import torch
from PIL import Image
from transformer_lens.components import MLP, LayerNorm

from vlm_lens import HookedVLM
from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens, patch_image_positions
from vlm_lens.analysis.patching import logit_diff_metric
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.qwen2_5_vl.mrope import mrope_rotary, rope_index
from vlm_lens.architectures.qwen2_5_vl.testing import (
    ATOL,
    IMAGE,
    IMAGE_TOKEN_ID,
    PROMPTS,
    SIZES,
    VISION_END_ID,
    VISION_START_ID,
    hf_inputs,
)
from vlm_lens.architectures.qwen2_5_vl.vision import full_mask
from vlm_lens.architectures.qwen2_vl.config import qwen2_vl_configs
from vlm_lens.architectures.qwen2_vl.processor import Qwen2VLImageProcessor
from vlm_lens.architectures.qwen2_vl.testing import (
    image,
    make_hf,
    make_processor,
    save_qwen2_vl,
    tiny_qwen2_vl_config,
)
from vlm_lens.testing import assert_hooks_live, assert_image_attention, assert_language_model_matches_hf
from vlm_lens.testing import real_positions as real

TWO_IMAGES = f"USER : {IMAGE} what is this ? {IMAGE} describe ASSISTANT :"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_qwen2_vl(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module")
def batch(model):
    """Left-padded rows: two images in one prompt (4x8 and 4x4 patches: 2x4 and 2x2 tokens), one tall image
    (10x6 patches, 5x3 tokens) in the other."""
    return model.prepare([TWO_IMAGES, PROMPTS[1]],
                         images=[[image(SIZES["wide"], 0), image(SIZES["square"], 2)], [image(SIZES["tall"], 1)]])


def test_loads_from_a_hub_layout_folder_without_torchvision(saved, model):
    path = saved[0]
    assert json.loads((path / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert (path / "video_preprocessor_config.json").exists()
    try:
        import torchvision  # noqa: F401
    except ImportError:  # the stock processor cannot be built here: that is why the family has a shim
        from transformers import AutoProcessor

        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(str(path))
    assert type(model.processor) is Qwen2VLImageProcessor and model.processor.chat_template is not None
    assert model.vlm_cfg.architecture == "Qwen2VLForConditionalGeneration" and model.vlm_cfg.vision.window_size is None


def test_components(model):
    """Full attention in every vision block, LayerNorm blocks with a quick-GELU MLP, a LayerNorm merger, M-RoPE."""
    assert all(b.attn.external_rotary is mrope_rotary for b in model.blocks)
    for block in model.vision.blocks:
        assert type(block.attn) is MaskedRotaryAttention and block.attn.mask_fn is full_mask
        assert isinstance(block.ln1, LayerNorm) and type(block.mlp) is MLP
        assert block.mlp.act_fn.__name__ == "quick_gelu"
    assert isinstance(model.projector.ln_q, LayerNorm)


def test_position_ids_match_get_rope_index(hf, batch):
    grids = batch.extras["image_grid_thw"]
    ours = rope_index(batch.tokens == IMAGE_TOKEN_ID, 2, grids, batch.attention_mask)
    ref, _ = hf.model.get_rope_index(batch.tokens, (batch.tokens == IMAGE_TOKEN_ID).long(), grids,
                                     attention_mask=batch.attention_mask)
    assert torch.equal(ours, ref)


def _hf_vision(hf, inputs):
    """Each HF vision block's output per image in our layout (raster order), plus HF's tower output."""
    grids, caught = inputs.extras["image_grid_thw"], {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, o))
               for i, b in enumerate(hf.model.visual.blocks)]
    try:
        with torch.no_grad():
            out = hf.model.visual(inputs.pixel_values, grid_thw=grids)
    finally:
        for h in handles:
            h.remove()

    def raster(x):  # the processor's 2x2-block order -> raster order, per image
        return [einops.rearrange(xi, "(R C m1 m2) d -> (R m1 C m2) d", R=h // 2, C=w // 2, m1=2, m2=2)
                for xi, (_, h, w) in zip(x.split(grids.prod(-1).tolist()), grids.tolist())]

    return [raster(caught[i]) for i in range(len(caught))], out


def test_vision_parity_stage_by_stage(model, hf, batch):
    blocks, out = _hf_vision(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    for layer, images in enumerate(blocks):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert ours.shape[:2] == (3, 60)  # images padded to the largest (10x6 patches)
        for i, ref in enumerate(images):
            assert (ours[i, :len(ref)] - ref).abs().max() <= ATOL, (layer, i)
    features = out.last_hidden_state.reshape(-1, 4 * 16)  # the processor's order is the merger's input order
    assert cache["hook_image_features"].shape == (8 + 4 + 15, 64)
    assert (cache["hook_image_features"] - features).abs().max() <= ATOL
    assert (cache["projector.hook_out"] - out.pooler_output).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - out.pooler_output).abs().max() <= ATOL
    # no windows: each patch attends to its whole image and nothing else (image 1 has 16 patches, image 0 has 32)
    pattern = cache["vision.blocks.0.attn.hook_pattern"]
    assert (pattern[0, :, :32, :32] > 0).all() and (pattern[1, :, :16, :16] > 0).all()
    assert_image_attention(pattern[0], 32)
    assert_image_attention(pattern[1], 16)


def test_language_model_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)
    # the images matter: without them (their tokens read as text) the logits move far more than ATOL
    with torch.no_grad():
        blind = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
    assert real(blind - ref.logits, batch).abs().max() > 100 * ATOL


def test_processed_weights_match_log_probs(saved, hf, batch):
    model = HookedVLM.from_pretrained(str(saved[0]))
    assert model.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_and_encodes_images_once(model, hf, batch, use_cache):
    hf.generation_config.eos_token_id = None  # generate all 8 tokens, past any eos
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(batch), max_new_tokens=8, do_sample=False, pad_token_id=0)
    towers = []
    ours = model.generate(batch, max_new_tokens=8, use_past_kv_cache=use_cache, stop_at_eos=False,
                          fwd_hooks=[("vision.hook_patch_embed", lambda v, hook: towers.append(1))])
    assert ours.shape == ref.shape == (2, batch.tokens.shape[1] + 8)
    assert torch.equal(ours, ref)
    assert len(towers) == 1


def test_every_hook_is_live(model, batch):
    """Every hook (the optional ones switched on) fires on an image forward and moves the logits. hook_attn_in
    goes on its own and in the vision tower only: TransformerLens refuses it for grouped-query attention."""
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    try:
        model.set_use_split_qkv_input(True)
        names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
        assert {"vision.hook_patch_embed", "vision.blocks.1.attn.hook_rot_k", "vision.blocks.0.mlp.hook_pre",
                "vision.blocks.0.ln1.hook_scale", "hook_image_features", "projector.hook_in",
                "projector.ln_q.hook_normalized", "projector.hook_hidden", "projector.hook_out", "hook_image_embeds",
                "blocks.0.attn.hook_rot_q"} <= set(names)
        assert_hooks_live(model, names, batch)
        model.set_use_split_qkv_input(False)
        model.vision.cfg.use_attn_in = True
        names = [n for n in model.hook_dict if n.startswith("vision.") and n.endswith("hook_attn_in")]
        assert len(names) == len(model.vision.blocks)
        assert_hooks_live(model, names, batch)
    finally:
        model.vision.cfg.use_attn_in = False
        for switch in (model.set_use_attn_result, model.set_use_hook_mlp_in, model.set_use_split_qkv_input):
            switch(False)


def test_prepare_uses_the_checkpoint_chat_template_and_labels_image_tokens(model):
    inputs = model.prepare("what is this ?", images=[image(SIZES["wide"], 3)], chat=True)
    words = model.processor.tokenizer.convert_ids_to_tokens(inputs.tokens[0])
    assert words[:4] == ["USER", ":", "<|vision_start|>", "<|image_pad|>"]
    assert words[-4:] == ["this", "?", "ASSISTANT", ":"]  # the template's newline is whitespace to this tokenizer
    layout = inputs.layout
    start, end = layout.markers(0).tolist()
    assert inputs.tokens[0, start] == VISION_START_ID and inputs.tokens[0, end] == VISION_END_ID
    assert layout.grid(0).shape == (2, 4) and layout.grid(0).flatten().tolist() == list(range(start + 1, end))
    labels = model.to_str_tokens(inputs)
    assert labels[int(layout.grid(0)[1, 2])] == "<img0 r1 c2>" and labels[start] == "<|vision_start|>"


def test_layout_grids_are_where_each_region_lands(model, batch):
    """With the vision blocks' outputs zeroed, a token sees only its own 8x8 px; inverting a pixel box of the
    second image of a prompt changes, at the first layer, exactly the tokens layout.grid / boxes name for it."""
    assert [tuple(batch.layout.grid(i).shape) for i in range(3)] == [(2, 4), (2, 2), (5, 3)]
    assert [batch.layout.batch_of(i) for i in range(3)] == [0, 0, 1]
    first, second = image((24, 16), 5), image((16, 24), 6)  # multiples of 8 px: the processor does not resize
    edited = np.array(second)
    edited[8:16, 8:24] = 255 - edited[8:16, 8:24]  # token row 1, columns 1 and 2
    zero = [(f"vision.blocks.{i}.hook_{s}_out", lambda v, hook: v * 0) for i in range(2) for s in ("attn", "mlp")]
    runs = []
    for img in (second, Image.fromarray(edited)):
        inputs = model.prepare(TWO_IMAGES, images=[[first, img]])
        with torch.no_grad(), model.hooks(fwd_hooks=zero):
            _, cache = model.run_with_cache(inputs, names_filter="blocks.0.hook_resid_pre")
        runs.append(cache["blocks.0.hook_resid_pre"][0])
    changed = set(((runs[0] - runs[1]).abs().amax(-1) > 1e-6).nonzero().flatten().tolist())
    layout = inputs.layout
    assert layout.grid(1).shape == (2, 3)
    assert changed == set(layout.grid(1)[1, 1:].tolist()) == set(layout.positions_in_box(1, (8, 8, 16, 24)).tolist())


def test_errors_teach_and_leave_the_model_unchanged(model, batch):
    with torch.no_grad():
        before = model(batch)
    tokens, pixels, grids = batch.tokens, batch.pixel_values, batch.extras["image_grid_thw"]
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(tokens, pixel_values=pixels)
    with pytest.raises(ValueError, match="26 image tokens but 3 image"):
        dropped = tokens.clone()
        dropped[1, int((tokens[1] == IMAGE_TOKEN_ID).nonzero()[0])] = 4
        model(dropped, pixel_values=pixels, image_grid_thw=grids)
    with pytest.raises(ValueError, match="still images"):
        model(tokens, pixel_values=pixels, image_grid_thw=torch.tensor([[2, 4, 8], [1, 4, 4], [1, 10, 6]]))
    with pytest.raises(ValueError, match="videos are not supported"):
        model.prepare("describe", videos=[np.zeros((2, 16, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="one image per placeholder"):
        model.prepare(TWO_IMAGES, images=[image(SIZES["square"], 0)])
    with pytest.raises(ValueError, match="hidden_act"):
        qwen2_vl_configs(tiny_qwen2_vl_config(hidden_act="gelu_fast"), torch.float32, "cpu")
    with torch.no_grad():
        assert torch.equal(model(batch), before)


def test_text_only_forward_equals_hf(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL


def test_analysis_toolkit_runs(model, batch):
    one = model.prepare(f"USER : {IMAGE} what colour ? ASSISTANT :", images=[image(SIZES["tall"], 3)])
    tokens, _ = logit_lens(model, one, k=3).on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 5, 3, 3)
    grid, last = one.layout.grid(0).flatten(), one.tokens.shape[1] - 1
    with torch.no_grad():
        base = model(one)
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=model.cfg.n_layers))
    first = int(grid.min())
    assert torch.allclose(base[:, :first], ablated[:, :first]) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last]) and not torch.allclose(base[:, last], knocked[:, last])

    # knockouts keep the family's own masks: left padding and causality in the LM, image bounds in the tower
    lm_names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    pad = int((~batch.attention_mask[1].bool()).sum())  # row 1 is the shorter one
    with torch.no_grad(), model.hooks(fwd_hooks=knockout_hooks(list(range(60)), [0], [0], tower="vision")
                                      + knockout_hooks([batch.tokens.shape[1] - 1], batch.layout.grid(2).flatten(),
                                                       "all", n_layers=model.cfg.n_layers)):
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n in lm_names or n.endswith("0.attn.hook_pattern"))
    vision = cache["vision.blocks.0.attn.hook_pattern"]
    assert (vision[:, :, :, 0] == 0).all()
    assert_image_attention(vision[1], 16)
    assert torch.allclose(vision[1, :, :16].sum(-1), torch.ones(2, 16))
    for name in lm_names:
        row = cache[name][1, :, -1]
        assert (row[:, :pad] == 0).all() and (row[:, batch.layout.grid(2).flatten()] == 0).all()
        assert torch.allclose(row.sum(-1), torch.ones(2)) and (cache[name][1].triu(1) == 0).all()

    clean, corrupted = (model.prepare(PROMPTS[1], images=[image(SIZES["wide"], s)]) for s in (4, 5))
    patched = patch_image_positions(model, clean, corrupted, logit_diff_metric(8, 9), layers=[0, 1])
    assert patched.values.shape == (2, 2, 4) and torch.isfinite(patched.values).all()
    readout = read_kv(model, model.prepare(PROMPTS, images=[[image(SIZES["wide"], 6)], [image(SIZES["wide"], 7)]]),
                      layers=[0, 1])
    assert readout.features("rot_k", 1).shape == (2, 2, 4, model.cfg.d_head)
    assert readout.features("image_features").shape == (2, 2, 4, 64)


# Qwen/Qwen2-VL-2B-Instruct's config.json as the hub ships it (written out here, not downloaded): text fields at
# the top level, rope_scaling of type "mrope", the tower's width in embed_dim and its output in hidden_size.
HUB_2B_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 8960,
    "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def test_reads_the_hub_config_of_qwen2_vl_2b():
    from transformers import Qwen2VLConfig

    cfg, vlm_cfg = qwen2_vl_configs(Qwen2VLConfig.from_dict(HUB_2B_CONFIG), torch.float32, "cpu")
    assert (cfg.d_head, cfg.n_key_value_heads, cfg.rotary_base, cfg.n_layers) == (128, 2, 1e6, 28)
    assert vlm_cfg.mrope_section == (16, 24, 24) and vlm_cfg.image_token_id == 151655
    vision = vlm_cfg.vision
    assert (vision.d_model, vision.d_mlp, vision.n_heads, vision.n_layers, vision.patch_size) == (1280, 5120, 16, 32, 14)
    assert (vision.act_fn, vision.window_size, vision.rotary_base) == ("quick_gelu", None, 10000.0)


def test_tied_embeddings_as_in_the_2b_model(batch):
    hf = make_hf(tiny_qwen2_vl_config(), seed=1)
    hf.config.tie_word_embeddings = True
    hf.tie_weights()
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    model = HookedVLM.from_hf(hf, make_processor())
    with torch.no_grad():
        assert real(model(batch) - hf(**hf_inputs(batch)).logits, batch).abs().max() <= ATOL
