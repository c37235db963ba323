"""HookedVLM equals PaliGemmaForConditionalGeneration, with a Gemma (PaliGemma) and a Gemma 2 (PaliGemma 2)
language model: SigLIP tower, projector, every residual, logits and greedy generation, with the prefix-LM
attention mask; layout, hooks, errors and the analysis toolkit on tiny seeded models saved as on the hub."""

import math

import pytest
import torch
from transformers import AutoProcessor

from vlm_lens import HookedVLM
from vlm_lens._tl.fast.attention import FastAttentionMixin
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens, patch_image_positions
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.paligemma.config import paligemma_configs
from vlm_lens.architectures.paligemma.mask import prefix_overlay
from vlm_lens.architectures.paligemma.modules import PaliGemmaProjector
from vlm_lens.architectures.paligemma.processor import PaliGemmaFlatProcessor
from vlm_lens.architectures.paligemma.testing import (
    ATOL,
    BOS_ID,
    EOS_ID,
    IMAGE_TOKEN_ID,
    NEWLINE_ID,
    PROMPTS,
    SIZES,
    hf_inputs,
    image,
    save_paligemma,
    tiny_paligemma_config,
)
from vlm_lens.testing import assert_hooks_live, assert_language_model_matches_hf, perturb
from vlm_lens.testing import real_positions as real

SUFFIXES = ["a cat", "red square"]


@pytest.fixture(scope="module", params=[1, 2], ids=["paligemma", "paligemma2"])
def saved(request, tmp_path_factory):
    return save_paligemma(tmp_path_factory.mktemp(f"paligemma{request.param}"), tiny_paligemma_config(request.param))


def images():
    """Row 0: one image; row 1: two, of other sizes and aspect ratios."""
    return [[image(SIZES["wide"], 0)], [image(SIZES["tall"], 1), image(SIZES["square"], 2)]]


@pytest.fixture(scope="module")
def batch(model):
    """Left-padded, with a suffix in each row (token_type_ids 1 there)."""
    return model.prepare(PROMPTS, images=images(), suffix=SUFFIXES)


def is_v2(model):
    return model.cfg.original_architecture == "Gemma2ForCausalLM"


def test_config_mirrors_transformer_lens_gemma(model):
    cfg = model.cfg
    assert cfg.n_key_value_heads == 1 and cfg.d_head == 16 and cfg.normalization_type == "RMS"
    assert all(b.attn.attention_overlay is prefix_overlay and not b.attn.overlay_within_window for b in model.blocks)
    assert type(model.projector) is PaliGemmaProjector and model.vision.ln_final is not None
    # the overlay keeps TransformerLens's explicit attention (which also soft-caps Gemma 2's scores)
    assert not any(isinstance(b.attn, FastAttentionMixin) for b in model.blocks)
    if is_v2(model):
        assert cfg.use_normalization_before_and_after and cfg.attn_types == ["local", "global"] and cfg.window_size == 6
        assert (cfg.attn_scores_soft_cap, cfg.output_logits_soft_cap, cfg.attn_scale) == (1.0, 2.0, math.sqrt(24))
    else:
        assert not cfg.use_normalization_before_and_after and not cfg.use_local_attn and cfg.attn_scale == 4.0
        assert cfg.output_logits_soft_cap <= 0 and cfg.attn_scores_soft_cap <= 0


def test_vision_and_projector_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf.model.vision_tower(pixel_values=batch.pixel_values, output_hidden_states=True)
        projected = hf.model.get_image_features(batch.pixel_values).pooler_output
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    for layer in range(len(model.vision.blocks)):
        assert (cache[f"vision.blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1]).abs().max() <= ATOL
    assert (cache["hook_image_features"] - ref.last_hidden_state).abs().max() <= ATOL  # after SigLIP's final norm
    assert cache["hook_image_embeds"].shape == (3, 16, 32)
    assert (cache["hook_image_embeds"] - projected).abs().max() <= ATOL  # no 1/sqrt(d_model) in transformers 5


@pytest.mark.parametrize("fast", [True, False])
def test_language_model_parity(saved, hf, batch, fast):
    model = HookedVLM.from_pretrained_no_processing(str(saved[0]), fast=fast)
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)


def test_prefix_mask_is_hfs(model, hf, batch):
    """Without token_type_ids (and with padding) transformers falls back to the causal mask: far from ours.
    The prefix (image, <bos>, prompt, "\\n") attends both ways; the suffix causally; on Gemma 2's sliding layer
    a prefix query reads the whole prefix past its window, a suffix query only its window."""
    with torch.no_grad():
        causal_only = hf(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values).logits
        ours, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    assert real(ours - causal_only, batch).abs().max() > 0.1
    row = 1
    types = batch.extras["token_type_ids"][row]
    real_pos = batch.attention_mask[row].nonzero().flatten()
    start, end = int(real_pos[0]), int(real_pos[-1])
    prefix_end = int((types[start:] == 1).nonzero()[0]) + start  # first suffix position
    assert batch.tokens[row, prefix_end - 1] == NEWLINE_ID and batch.tokens[row, end] == EOS_ID
    pattern = cache["blocks.0.attn.hook_pattern"][row]  # local on Gemma 2, global on Gemma
    assert (pattern[:, start, start:prefix_end] > 0).all() and (pattern[:, start, prefix_end:] == 0).all()
    window = model.cfg.window_size if is_v2(model) else end + 1
    first_key = max(start, end - window + 1)
    assert (pattern[:, end, first_key:end + 1] > 0).all() and (pattern[:, end, :first_key] == 0).all()
    if is_v2(model):
        assert prefix_end - start > 2 * window  # the prefix is longer than the window
        with torch.no_grad():
            hf_pattern = hf(**hf_inputs(batch), output_attentions=True).attentions[0][row]
        assert torch.equal(hf_pattern[:, start:end + 1, start:end + 1] > 0, pattern[:, start:end + 1, start:end + 1] > 0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_and_tower_runs_once(model, hf, use_cache):
    """Generated tokens are suffix: causal, also without the KV cache where each step re-runs the prompt."""
    prompt = model.prepare(PROMPTS, images=images())
    hf.generation_config.eos_token_id = None  # generate every token, past any eos
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    calls = []
    ours = model.generate(prompt, max_new_tokens=6, use_past_kv_cache=use_cache, stop_at_eos=False,
                          fwd_hooks=[("vision.hook_patch_embed", lambda x, hook: calls.append(1))])
    assert ours.shape == ref.shape == (2, prompt.tokens.shape[1] + 6)
    assert torch.equal(ours, ref) and len(calls) == 1


def test_processed_weights_match_log_probs(saved, hf, batch):
    model = HookedVLM.from_pretrained(str(saved[0]))
    assert model.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL  # Gemma 2: center_unembed is off (soft-capped logits)


def test_every_hook_fires_and_matters(saved, batch):
    model = HookedVLM.from_pretrained_no_processing(str(saved[0]))
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
    required = ["vision.hook_patch_embed", "vision.hook_pos_embed", "vision.ln_final.hook_normalized",
                "hook_image_features", "projector.hook_in", "projector.hook_out", "hook_image_embeds", "hook_embed",
                "blocks.1.attn.hook_pattern"]
    if is_v2(model):
        required += ["blocks.0.ln1_post.hook_normalized", "blocks.1.ln2_post.hook_normalized"]
    assert set(required) <= set(names)
    assert_hooks_live(model, names, batch)


def test_layout_grids_boxes_and_labels(model, batch):
    layout = batch.layout
    assert [tuple(layout.grid(i).shape) for i in range(3)] == [(4, 4)] * 3
    assert [layout.batch_of(i) for i in range(3)] == [0, 1, 1]
    for i in range(3):
        assert (batch.tokens[layout.batch_of(i), layout.grid(i).flatten()] == IMAGE_TOKEN_ID).all()
    for i in (0, 2):  # the last image of each row is followed by <bos>
        assert batch.tokens[layout.batch_of(i), int(layout.grid(i)[-1, -1]) + 1] == BOS_ID
    boxes = layout.boxes(0)  # 20x30 stretched onto the tile: a token covers 5 x 7.5 px of the original
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 5.0, 7.5], dtype=torch.float64))
    assert model.to_str_tokens(batch)[1][int(layout.grid(2)[1, 2])] == "<img2 r1 c2>"


@pytest.mark.parametrize("cell", [(0, 3), (2, 1)])
def test_grid_cells_are_where_the_layout_says(model, batch, cell):
    """Perturb one patch of image 2: only its position moves at the first layer's input."""
    r, c = cell

    def edit(features, hook):
        out = features.clone()
        out[2, 4 * r + c] = perturb(out[2, 4 * r + c])
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


def test_prepare_uses_the_checkpoints_processor_and_suffix(model, saved):
    assert type(model.processor) is PaliGemmaFlatProcessor
    assert type(AutoProcessor.from_pretrained(str(saved[0]))).__name__ == "PaliGemmaProcessor"  # no torchvision needed
    plain = model.prepare("what is this ?", images=[image(SIZES["square"], 3)])  # placeholder put before the prompt
    words = model.to_str_tokens(plain)
    assert words[16:] == ["<bos>", "what", "is", "this", "?", "\n"]  # PaliGemma's format: no extra line break
    assert (plain.extras["token_type_ids"] == 0).all()  # no suffix: all prefix
    with_suffix = model.prepare("what is this ?", images=[image(SIZES["square"], 3)], suffix="a cat")
    assert model.to_str_tokens(with_suffix)[-3:] == ["a", "cat", "<eos>"]
    assert with_suffix.extras["token_type_ids"][0, -3:].tolist() == [1, 1, 1]
    assert with_suffix.extras["token_type_ids"][0, :-3].eq(0).all()
    flat = model.processor(text=PROMPTS, images=[im for row in images() for im in row], return_tensors="pt", padding=True)
    nested = model.processor(text=PROMPTS, images=images(), return_tensors="pt", padding=True)
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and torch.equal(flat["pixel_values"], nested["pixel_values"])


def test_token_type_ids_default_to_all_prefix(model, batch):
    """Tokens without token_type_ids are all prefix, as the processor writes a prompt without a suffix."""
    plain = model.prepare(PROMPTS, images=images())
    with torch.no_grad():
        given = model(plain)
        bare = model(plain.tokens, pixel_values=plain.pixel_values, attention_mask=plain.attention_mask)
        as_kwarg = model(batch.tokens, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask,
                         token_type_ids=batch.extras["token_type_ids"])
        all_prefix = model(batch.tokens, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
    assert torch.equal(given, bare)
    assert torch.allclose(as_kwarg, model(batch), atol=1e-6) and not torch.allclose(all_prefix, as_kwarg, atol=1e-3)


def test_errors_teach_and_leave_the_model_unchanged(model, batch):
    tokens, pixels = batch.tokens, batch.pixel_values
    with torch.no_grad():
        before = model(batch)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(tokens, pixel_values=pixels[..., :12])
    with pytest.raises(ValueError, match="image tokens but 2 image"):
        model(tokens, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(tokens, pixel_values=pixels, token_type_ids=batch.extras["token_type_ids"][:, 1:])
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(tokens, pixel_values=pixels, token_type_ids=batch.extras["token_type_ids"][0])
    with pytest.raises(ValueError, match="videos are not supported"):
        model.processor(text=PROMPTS[0], images=[image(SIZES["wide"], 0)], videos=[image(SIZES["wide"], 0)])
    with pytest.raises(ValueError, match="placeholder"):
        model.prepare(PROMPTS[1], images=[image(SIZES["wide"], 0)])
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(*tokens.shape, model.cfg.d_model), start_at_layer=1)
    with torch.no_grad():
        assert torch.equal(model(batch), before)


@pytest.mark.parametrize(("version", "override", "match"), [
    (1, dict(attention_bias=True), "attention_bias"),
    (2, dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    (1, dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    (1, dict(vocab_size=3), "outside the text vocabulary"),
])
def test_unsupported_configs_are_refused(version, override, match):
    with pytest.raises(ValueError, match=match):
        paligemma_configs(tiny_paligemma_config(version, **override), torch.float32, "cpu")


def test_analysis_toolkit_runs(model):
    one = model.prepare("what colour ?", images=[image(SIZES["tall"], 4)], suffix="red")
    tokens, _ = logit_lens(model, one, k=3).on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 4, 4, 3)
    grid = one.layout.grid(0).flatten()
    first, last = int(grid.min()), one.tokens.shape[1] - 1
    prompt_end = int((one.extras["token_type_ids"][0] == 1).nonzero()[0]) - 1  # the "\n" closing the prefix
    n = model.cfg.n_layers
    with torch.no_grad():
        base = model(one)
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=n))
        # the knockout acts on the family's mask: the first image token reads the prompt after it (prefix),
        # the prefix does not read the suffix
        reads_prompt = model.run_with_hooks(one, fwd_hooks=knockout_hooks([first], [prompt_end], "all", n_layers=n))
        future_suffix = model.run_with_hooks(one, fwd_hooks=knockout_hooks([prompt_end], [last], "all", n_layers=n))
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(16)), [0], [0], tower="vision"))
    assert not torch.allclose(base, ablated) and not torch.allclose(base[:, last], knocked[:, last])
    assert torch.allclose(base[:, :last], knocked[:, :last])
    assert not torch.allclose(base[:, first], reads_prompt[:, first]) and torch.equal(base, future_suffix)
    assert not torch.allclose(base, vision_knock)
    corrupted = model.prepare("what colour ?", images=[image(SIZES["tall"], 5)], suffix="red")
    patched = patch_image_positions(model, one, corrupted, lambda logits: logits[:, -1].max(), layers=[0, 1])
    assert patched.values.shape == (2, 4, 4) and torch.isfinite(patched.values).all()
    two = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 6)], [image(SIZES["wide"], 7)] * 2])
    readout = read_kv(model, two, layers=[0, 1], sites=("k", "rot_k", "v", "image_features", "image_embeds"))
    assert readout.features("rot_k", 1).shape == (3, 4, 4, model.cfg.d_head)
    with torch.no_grad():
        _, cache = model.run_with_cache(two, names_filter="hook_image_embeds")
    assert torch.equal(readout.features("image_embeds"), cache["hook_image_embeds"].reshape(3, 4, 4, -1))
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
