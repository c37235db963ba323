"""HookedVLM equals Gemma3ForConditionalGeneration: SigLIP tower, pooling projector, every residual, logits and
greedy generation, with the image-block attention mask; layout, hooks, errors and the analysis toolkit on a
tiny seeded model saved as on the hub."""

import math

import pytest
import torch
from transformers import AutoProcessor

from vlm_lens import HookedVLM
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens, patch_image_positions
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.gemma3.config import gemma3_configs
from vlm_lens.architectures.gemma3.mask import image_block_overlay, image_blocks
from vlm_lens.architectures.gemma3.modules import Gemma3Projector, HookedGemma3Vision
from vlm_lens.architectures.gemma3.processor import Gemma3FlatProcessor
from vlm_lens.architectures.gemma3.testing import (
    ATOL,
    BOI,
    BOI_ID,
    BOS_ID,
    EOI_ID,
    IMAGE_TOKEN_ID,
    PROMPTS,
    SIZES,
    hf_inputs,
    image,
    save_gemma3,
    tiny_gemma3_config,
)
from vlm_lens.testing import assert_hooks_live, assert_language_model_matches_hf, perturb
from vlm_lens.testing import real_positions as real


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def plain_model(saved):
    """TransformerLens's own components (fast=False)."""
    return HookedVLM.from_pretrained_no_processing(str(saved[0]), fast=False)


@pytest.fixture(scope="module")
def batch(model):
    """Two rows, left padding: one image in the first, two (different sizes and aspect ratios) in the second."""
    return model.prepare(PROMPTS, images=[[image(SIZES["wide"], 0)], [image(SIZES["tall"], 1), image(SIZES["square"], 2)]])


def test_config_mirrors_transformer_lens_gemma3(model):
    cfg = model.cfg
    assert cfg.use_qk_norm and cfg.use_normalization_before_and_after and cfg.n_key_value_heads == 1
    assert cfg.attn_types == ["local", "global", "local"] and cfg.window_size == 6
    assert (cfg.rotary_base_local, cfg.rotary_base, cfg.rotary_scaling_factor) == (1e4, 1e6, 8.0)
    assert cfg.attn_scale == math.sqrt(24) and cfg.output_logits_soft_cap <= 0
    assert all(b.attn.attention_overlay is image_block_overlay for b in model.blocks)
    assert type(model.vision) is HookedGemma3Vision and type(model.projector) is Gemma3Projector


def test_vision_and_projector_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=batch.pixel_values, output_hidden_states=True)
        projected = hf.model.get_image_features(batch.pixel_values).pooler_output
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    for layer in range(len(model.vision.blocks)):
        assert (cache[f"vision.blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1]).abs().max() <= ATOL
    assert (cache["hook_image_features"] - ref.last_hidden_state).abs().max() <= ATOL  # after SigLIP's final norm
    assert cache["projector.hook_hidden"].shape == (3, 9, 24)  # 6x6 patches pooled 2x2
    assert (cache["projector.hook_out"] - projected).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - projected).abs().max() <= ATOL


@pytest.mark.parametrize("which", ["model", "plain_model"])
def test_language_model_parity(which, hf, batch, request):
    model = request.getfixturevalue(which)
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    # the merged sequence: text embeddings scaled by sqrt(d_model), image embeddings not
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)


def test_image_block_mask_is_hfs(model, hf, batch):
    """Without token_type_ids transformers drops the image-block mask; the logits then move far from ours."""
    with torch.no_grad():
        causal_only = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values).logits
        ours, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    assert real(ours - causal_only, batch).abs().max() > 0.1
    blocks = image_blocks(batch.tokens == IMAGE_TOKEN_ID)
    assert blocks[1].unique().tolist() == [-1, 0, 1]  # two images in row 1, numbered per row
    grid = batch.layout.grid(1).flatten()  # row 1, its first image: 9 tokens
    first, last = int(grid[0]), int(grid[-1])
    local, full = cache["blocks.0.attn.hook_pattern"][1], cache["blocks.1.attn.hook_pattern"][1]
    assert (full[:, first, first:last + 1] > 0).all() and (full[:, first, last + 1:] == 0).all()
    assert (local[:, first, first:last + 1] > 0).all()  # later image keys are allowed in the local window too
    assert (local[:, last, last - 5:last + 1] > 0).all() and (local[:, last, :last - 5] == 0).all()  # 6-token window


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_and_tower_runs_once(model, hf, batch, use_cache):
    hf.generation_config.eos_token_id = None  # generate every token, past any eos
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(batch), max_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = []
    ours = model.generate(batch, max_new_tokens=6, use_past_kv_cache=use_cache, stop_at_eos=False,
                          fwd_hooks=[("vision.hook_patch_embed", lambda x, hook: calls.append(1))])
    assert ours.shape == ref.shape == (2, batch.tokens.shape[1] + 6)
    assert torch.equal(ours, ref) and len(calls) == 1


def test_processed_weights_match_log_probs(saved, hf, batch):
    model = HookedVLM.from_pretrained(str(saved[0]))
    assert model.cfg.normalization_type == "RMSPre" and "blocks.0.ln1_post.w" in model.state_dict()
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


def test_every_hook_fires_and_matters(saved, batch):
    model = HookedVLM.from_pretrained_no_processing(str(saved[0]))
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
    for required in ("vision.hook_patch_embed", "vision.hook_pos_embed", "vision.ln_final.hook_normalized",
                     "hook_image_features", "projector.hook_in", "projector.hook_hidden", "projector.ln.hook_normalized",
                     "projector.hook_out", "hook_image_embeds", "hook_embed", "blocks.0.attn.q_norm.hook_normalized",
                     "blocks.1.ln1_post.hook_normalized", "blocks.2.ln2_post.hook_normalized"):
        assert required in names
    assert_hooks_live(model, names, batch)


def test_layout_grids_markers_boxes_and_labels(model, batch):
    layout = batch.layout
    assert [tuple(layout.grid(i).shape) for i in range(3)] == [(3, 3)] * 3
    assert [layout.batch_of(i) for i in range(3)] == [0, 1, 1]
    for i in range(3):
        start, end = layout.markers(i).tolist()
        row = batch.tokens[layout.batch_of(i)]
        assert row[start] == BOI_ID and row[end] == EOI_ID and end - start - 1 == 9
    boxes = layout.boxes(0)  # 20x30 stretched onto the tile: a token covers 20/3 x 10 px of the original
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 20 / 3, 10.0], dtype=torch.float64))
    assert layout.positions_in_box(0, (15, 25, 20, 30)).tolist() == [int(layout.grid(0)[2, 2])]
    assert model.to_str_tokens(batch)[1][int(layout.grid(2)[1, 2])] == "<img2 r1 c2>"


@pytest.mark.parametrize("cell", [(0, 2), (2, 1)])
def test_grid_cells_are_where_the_layout_says(model, batch, cell):
    """Perturb the 2x2 patches of one pooled cell of image 2: only that cell's position moves at the first layer."""
    r, c = cell

    def edit(features, hook):
        grid = features[2].reshape(6, 6, -1).clone()
        grid[2 * r:2 * r + 2, 2 * c:2 * c + 2] = perturb(grid[2 * r:2 * r + 2, 2 * c:2 * c + 2])
        out = features.clone()
        out[2] = grid.reshape(36, -1)
        return out

    names = lambda n: n == "blocks.0.hook_resid_pre"  # noqa: E731
    with torch.no_grad():
        _, base = model.run_with_cache(batch, names_filter=names)
        with model.hooks(fwd_hooks=[("hook_image_features", edit)]):
            _, moved = model.run_with_cache(batch, names_filter=names)
    changed = (moved["blocks.0.hook_resid_pre"] - base["blocks.0.hook_resid_pre"]).abs().amax(-1) > 1e-6
    expected = torch.zeros_like(changed)
    expected[batch.layout.batch_of(2), int(batch.layout.grid(2)[r, c])] = True
    assert torch.equal(changed, expected)


def test_prepare_uses_the_checkpoints_processor_and_chat_template(model, saved):
    assert type(model.processor) is Gemma3FlatProcessor
    assert type(AutoProcessor.from_pretrained(str(saved[0]))).__name__ == "Gemma3Processor"  # no torchvision needed
    chat = model.prepare("what colour ?", images=[image(SIZES["square"], 3)], chat=True)
    words = model.to_str_tokens(chat)
    assert words[:3] == ["<bos>", "<start_of_turn>", "user"] and words.count("<bos>") == 1  # the template's BOS only
    assert words[-3:] == ["<start_of_turn>", "model", "\n\n"] and chat.layout.grid(0).shape == (3, 3)
    plain = model.prepare("what colour ?", images=[image(SIZES["square"], 3)])
    assert plain.tokens[0, 0] == BOS_ID and (plain.tokens == BOI_ID).sum() == 1  # placeholder put before the prompt
    flat = model.processor(text=PROMPTS, images=[image(SIZES["wide"], 0), image(SIZES["tall"], 1), image(SIZES["square"], 2)],
                           return_tensors="pt", padding=True)
    nested = model.processor(text=PROMPTS, images=[[image(SIZES["wide"], 0)], [image(SIZES["tall"], 1), image(SIZES["square"], 2)]],
                             return_tensors="pt", padding=True)
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and torch.equal(flat["pixel_values"], nested["pixel_values"])
    assert torch.equal(nested["token_type_ids"], (nested["input_ids"] == IMAGE_TOKEN_ID).long())


def test_errors_teach_and_leave_the_model_unchanged(model, batch):
    tokens, pixels = batch.tokens, batch.pixel_values
    with torch.no_grad():
        before = model(batch)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(tokens, pixel_values=pixels[..., :16])
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        model(tokens, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="pan-and-scan"):
        model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 0)], do_pan_and_scan=True)
    with pytest.raises(ValueError, match="videos are not supported"):
        model.processor(text=PROMPTS[0], videos=[image(SIZES["wide"], 0)])
    with pytest.raises(ValueError, match="placeholder"):
        model.prepare(PROMPTS[1], images=[image(SIZES["wide"], 0)])
    with pytest.raises(ValueError, match="one image per placeholder"):
        model.processor(text=PROMPTS, images=[image(SIZES["wide"], 0)])
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(*tokens.shape, model.cfg.d_model), start_at_layer=1)
    with torch.no_grad():
        assert torch.equal(model(batch), before)


@pytest.mark.parametrize(("override", "match"), [
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
                           "full_attention": {"rope_type": "default", "rope_theta": 1e6}}), "sliding_attention"),
    (dict(vocab_size=3), "outside the text vocabulary"),
])
def test_unsupported_configs_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        gemma3_configs(tiny_gemma3_config(**override), torch.float32, "cpu")


def test_text_only_forward_equals_hf(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL


def test_analysis_toolkit_runs(model):
    one = model.prepare(f"USER : {BOI} what colour ? ASSISTANT :", images=[image(SIZES["tall"], 4)])
    tokens, _ = logit_lens(model, one, k=3).on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 3, 3, 3)
    grid = one.layout.grid(0).flatten()
    first, last = int(grid.min()), one.tokens.shape[1] - 1
    with torch.no_grad():
        base = model(one)
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=model.cfg.n_layers))
        # the knockout acts on the family's mask: the first image token reads later image tokens, text does not
        forward_in_image = model.run_with_hooks(one, fwd_hooks=knockout_hooks([first], grid[1:], "all", n_layers=3))
        future_text = model.run_with_hooks(one, fwd_hooks=knockout_hooks([first - 1], [last], "all", n_layers=3))
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(36)), [0], [0], tower="vision"))
    assert torch.allclose(base[:, :first], ablated[:, :first]) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last]) and not torch.allclose(base[:, last], knocked[:, last])
    assert not torch.allclose(base[:, first], forward_in_image[:, first]) and torch.equal(base, future_text)
    assert not torch.allclose(base, vision_knock)
    corrupted = model.prepare(f"USER : {BOI} what colour ? ASSISTANT :", images=[image(SIZES["tall"], 5)])
    patched = patch_image_positions(model, one, corrupted, lambda logits: logits[:, -1].max(), layers=[0, 2])
    assert patched.values.shape == (2, 3, 3) and torch.isfinite(patched.values).all()
    # "image_features" are the 6x6 patches before pooling, not one row per token: read the embeds instead
    two = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 6)], [image(SIZES["wide"], 7)] * 2])
    readout = read_kv(model, two, layers=[0, 1], sites=("k", "rot_k", "v", "image_embeds"))
    assert readout.features("rot_k", 1).shape == (3, 3, 3, model.cfg.d_head)
    with torch.no_grad():
        _, cache = model.run_with_cache(two, names_filter="hook_image_embeds")
    assert torch.equal(readout.features("image_embeds"), cache["hook_image_embeds"].reshape(3, 3, 3, -1))
    with pytest.raises(ValueError, match="Read site 'image_embeds' instead"):
        read_kv(model, two, layers=[0], sites=("image_features",))
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_start_at_layer_is_refused_rather_than_silently_wrong(model, batch):
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(*batch.tokens.shape, model.cfg.d_model), start_at_layer=1)
