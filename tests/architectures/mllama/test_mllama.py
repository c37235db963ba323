"""Mllama (Llama 3.2 Vision): parity with HF stage by stage, per-row batch semantics, generation, hooks, the
key-axis layout, ablation, knockout and patching on the cross-attention keys, the logit lens, ``fast=False``."""

from __future__ import annotations

import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.analysis.ablation import image_ablation_hooks
from vlm_lens.analysis.logit_lens import logit_lens
from vlm_lens.analysis.patching import patch_image_positions
from vlm_lens.architectures.mllama.analysis import (
    cross_knockout_hooks,
    cross_kv,
    image_keys,
    key_patch_hooks,
    patch_image_keys,
)
from vlm_lens.architectures.mllama.testing import ATOL, IMAGE, hf_inputs, image, save_mllama
from vlm_lens.hook_names import cross_attn_name
from vlm_lens.testing import assert_hooks_live, perturb

# Row 0: a wide image (1x3 tiles); row 1: a square (2x2) and a tall (3x1) image, with text between them;
# row 2: text only. Left padding.
PROMPTS = [f"{IMAGE} what is this ?", f"a cat {IMAGE} is red {IMAGE} describe", "what is the colour ?"]
IMAGES = [[image((8, 20))], [image((16, 16), 1), image((20, 8), 2)], []]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_mllama(tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return HookedVLM.from_pretrained_no_processing(str(checkpoint[0]))


@pytest.fixture(scope="module")
def batch(model):
    return model.prepare(PROMPTS, images=IMAGES)


def _alone(model, hf, row: int) -> torch.Tensor:
    inputs = model.prepare(PROMPTS[row], images=IMAGES[row])
    with torch.no_grad():
        return hf(**hf_inputs(inputs)).logits[0]


def test_stage_parity_single_image(model, checkpoint):
    hf = checkpoint[1]
    inputs = model.prepare(PROMPTS[1], images=IMAGES[1])
    with torch.no_grad():
        ref = hf(**hf_inputs(inputs), output_hidden_states=True)
        hf_vision = hf.model.vision_model(inputs.pixel_values, inputs.extras["aspect_ratio_ids"],
                                          inputs.extras["aspect_ratio_mask"]).last_hidden_state
        logits, cache = model.run_with_cache(inputs)
    features = cache["hook_image_features"]
    assert (features - hf_vision[0].flatten(1, 2)).abs().max() < ATOL
    projected = hf.model.multi_modal_projector(hf_vision[0].flatten(1, 2))
    assert (cache["hook_image_embeds"] - projected).abs().max() < ATOL
    for layer in range(model.cfg.n_layers):
        diff = (cache[f"blocks.{layer}.hook_resid_post"] - ref.hidden_states[layer + 1]).abs().max()
        if layer < model.cfg.n_layers - 1:  # HF's last hidden state is after the final norm
            assert diff < ATOL, (layer, diff)
    assert (logits - ref.logits).abs().max() < ATOL


def test_padded_batch_rows_equal_hf_alone(model, checkpoint, batch):
    hf = checkpoint[1]
    assert batch.pixel_values.shape[:3] == (3, 2, 4)
    with torch.no_grad():
        logits = model(batch)
        hf_batched = hf(**hf_inputs(batch)).logits
    for row in range(3):
        real = batch.attention_mask[row].bool()
        assert (logits[row, real] - _alone(model, hf, row)).abs().max() < ATOL, row
    # HF's batched text-only row reads the zero-padded image slot; vlm_lens keeps the single-row result.
    assert (hf_batched[2, batch.attention_mask[2].bool()] - _alone(model, hf, 2)).abs().max() > 1e-2


def test_processed_weights_log_probs(checkpoint, batch):
    path, hf = checkpoint
    processed = HookedVLM.from_pretrained(str(path))
    with torch.no_grad():
        out = processed(batch).log_softmax(-1)
    for row in range(3):
        ref = _alone(processed, hf, row).log_softmax(-1)
        assert (out[row, batch.attention_mask[row].bool()] - ref).abs().max() < ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf(model, checkpoint, use_cache):
    hf = checkpoint[1]
    for row in range(3):
        inputs = model.prepare(PROMPTS[row], images=IMAGES[row])
        with torch.no_grad():
            ref = hf.generate(**hf_inputs(inputs), max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ours = model.generate(inputs, max_new_tokens=6, use_past_kv_cache=use_cache, stop_at_eos=False,
                              verbose=False, return_type="tokens")
        assert ours.tolist() == ref.tolist(), row
    # the batch (left-padded) gives each row's own greedy tokens
    batched = model.generate(model.prepare(PROMPTS, images=IMAGES), max_new_tokens=4, stop_at_eos=False,
                             use_past_kv_cache=use_cache, verbose=False, return_type="new_tokens")
    for row in range(3):
        alone = model.generate(model.prepare(PROMPTS[row], images=IMAGES[row]), max_new_tokens=4, stop_at_eos=False,
                               use_past_kv_cache=use_cache, verbose=False, return_type="new_tokens")
        assert batched[row].tolist() == alone[0].tolist()


def test_every_hook_is_live(model):
    inputs = model.prepare(PROMPTS[1], images=IMAGES[1])
    _, cache = model.run_with_cache(inputs)
    fired = sorted(cache.keys())
    expected = ["vision.hook_patch_embed", "vision.hook_pre_tile_embed", "vision.hook_pos_embed",
                "vision.ln_pre.hook_normalized", "vision.blocks.1.attn.hook_pattern", "vision.ln_post.hook_normalized",
                "vision.hook_post_tile_embed", "vision.global_blocks.0.hook_attn_out", "hook_image_features",
                "projector.hook_in", "projector.hook_out", "hook_image_embeds", "blocks.2.cross_attn.hook_q",
                "blocks.2.cross_attn.hook_k", "blocks.2.cross_attn.hook_v", "blocks.2.cross_attn.hook_attn_scores",
                "blocks.2.cross_attn.hook_pattern", "blocks.2.cross_attn.hook_z", "blocks.2.hook_attn_gate",
                "blocks.2.hook_cross_attn_out", "blocks.2.hook_mlp_gate", "blocks.2.hook_mlp_out",
                "blocks.1.attn.hook_pattern", "hook_embed"]
    assert not set(expected) - set(fired)
    # ln_cross feeds the queries only, and q_norm divides each query head by its RMS: the per-position scale
    # cancels exactly, so its change cannot reach anything (HF's layer has the same invariance).
    invariant = {f"blocks.{i}.ln_cross.hook_scale" for i in model.vlm_cfg.cross_attention_layers}
    # The global block's keys move the tower's output (by ~1e-5 here), below the logits' allclose tolerance.
    weak = {"vision.global_blocks.0.attn.hook_k"}
    assert_hooks_live(model, [n for n in fired if n not in invariant | weak], inputs)
    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter="hook_image_embeds")
        with model.hooks(fwd_hooks=[(name, lambda v, hook: perturb(v)) for name in weak]):
            _, moved = model.run_with_cache(inputs, names_filter="hook_image_embeds")
    assert (moved["hook_image_embeds"] - base["hook_image_embeds"]).abs().max() > 1e-6


def test_layout_is_on_the_key_axis(model, batch):
    layout, keys = batch.layout, model.vlm_cfg.keys_per_image
    assert layout.axis == "keys"
    labels = model.to_str_tokens(batch)
    assert sum(t.startswith("<img") for row in labels for t in row) == 3 and "<img2>" in labels[1]
    assert layout.n_images == 3 and [layout.batch_of(i) for i in range(3)] == [0, 1, 1]
    assert [tuple(layout.grid(i).shape) for i in range(3)] == [(2, 6), (4, 4), (6, 2)]
    grid = layout.grid(2)  # second image of row 1: keys [K, 2K)
    assert grid.min() >= keys and grid.max() < 2 * keys and grid.unique().numel() == grid.numel()
    assert (grid[:2, :2].flatten() - keys).tolist() == [1, 2, 3, 4]  # tile 0's patches, after its class token


def test_ablating_one_tile_changes_only_what_reads_it(model):
    # "a cat" reads image 0 only; "is red describe" reads image 1 (the tall one) from its <|image|> on.
    inputs = model.prepare(f"{IMAGE} a cat {IMAGE} is red", images=[[image((16, 16), 1), image((20, 8), 2)]])
    tile = inputs.layout.grid(1)[:2].flatten()  # image 1's first tile (a 2x2 patch grid)
    hooks = image_ablation_hooks(inputs, tile, "zero")
    base, cache = model.run_with_cache(inputs)
    with model.hooks(fwd_hooks=hooks):
        ablated, ablated_cache = model.run_with_cache(inputs)
    assert torch.equal(ablated_cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"])
    reads_image_1 = inputs.tokens[0] == inputs.tokens[0]
    reads_image_1[:4] = False  # <|image|> <s> a cat read image 0 only
    moved = (ablated[0] - base[0]).abs().amax(-1)
    assert (moved[~reads_image_1] == 0).all() and (moved[reads_image_1] > 1e-3).all()


def test_cross_knockout_and_kv_readout(model):
    inputs = model.prepare(PROMPTS[1], images=IMAGES[1])
    last = inputs.tokens.shape[1] - 1
    keys = inputs.layout.grid(1).flatten()
    base = model(inputs)
    knocked = model.run_with_hooks(inputs, fwd_hooks=cross_knockout_hooks([last], keys, layers=[2]))
    moved = (knocked[0] - base[0]).abs().amax(-1)
    assert moved[last] > 1e-3 and (moved[:last] == 0).all()
    k, v = cross_kv(model, inputs, layer=2)
    n_keys = 2 * model.vlm_cfg.keys_per_image
    assert k.shape == v.shape == (1, n_keys, model.cfg.n_key_value_heads, model.cfg.d_head)


def test_bad_input_raises_and_changes_nothing(model, batch):
    before = {k: v.clone() for k, v in model.state_dict().items() if "vision" in k}
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        model(batch.tokens, pixel_values=batch.pixel_values)
    with pytest.raises(ValueError, match="tile slots|max_num_tiles|tiles"):
        model(batch.tokens, pixel_values=batch.pixel_values[:, :, :2], **{k: batch.extras[k] for k in
                                                                           ("aspect_ratio_ids", "aspect_ratio_mask",
                                                                            "cross_attention_mask")})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_patch_image_keys_on_the_grid(model):
    # two images of one size (2x2 tiles): the same tokens and key layout, different keys
    prompt, cross = f"{IMAGE} what is this ?", list(model.vlm_cfg.cross_attention_layers)
    clean = model.prepare(prompt, images=[[image((16, 16), 1)]])
    corrupted = model.prepare(prompt, images=[[image((16, 16), 5)]])
    answer = int(model(clean)[0, -1].argmax())
    metric = lambda logits: logits[0, -1].log_softmax(-1)[answer]  # noqa: E731
    with torch.no_grad():
        clean_value, corrupted_value = float(metric(model(clean))), float(metric(model(corrupted)))
    assert abs(clean_value - corrupted_value) > 1e-2
    names = {cross_attn_name(n, layer) for layer in cross for n in ("k", "v")}
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name in names)
    clean_kv = {name: cache[name] for name in names}
    with torch.no_grad():
        every = model.run_with_hooks(corrupted, fwd_hooks=key_patch_hooks(clean_kv, 0, image_keys(model, clean, 0), cross))
        none = model.run_with_hooks(corrupted, fwd_hooks=key_patch_hooks(clean_kv, 0, [], cross))
    assert abs(float(metric(every)) - clean_value) < 1e-5
    assert float(metric(none)) == corrupted_value

    result = patch_image_keys(model, clean, corrupted, metric)
    grid = clean.layout.grid(0)
    assert result.values.shape == (len(cross), *grid.shape) and result.layers == cross
    with torch.no_grad():  # one cell is the run patching that one key
        one = model.run_with_hooks(corrupted, fwd_hooks=key_patch_hooks(clean_kv, 0, [int(grid[1, 2])], cross[:1]))
    assert abs(result.values[0, 1, 2] - float(metric(one))) < 1e-6
    assert (result.values - corrupted_value).abs().max() > 1e-4  # some key moves the metric
    with pytest.raises(ValueError, match="not cross-attention blocks"):
        patch_image_keys(model, clean, corrupted, metric, layers=[0])
    with pytest.raises(ValueError, match="patch_image_keys"):  # it would patch key indices as sequence positions
        patch_image_positions(model, clean, corrupted, metric)
    with pytest.raises(ValueError, match="same tiles|same tokens"):
        patch_image_keys(model, clean, model.prepare(prompt, images=[[image((8, 20), 5)]]), metric)


def test_logit_lens_on_text_positions(model, batch):
    # the image is never a token: the lens reads text positions, here the last 3 of each (left-padded) row
    length, first_cross = batch.tokens.shape[1], min(model.vlm_cfg.cross_attention_layers)
    positions = torch.arange(length - 3, length)
    result = logit_lens(model, batch, positions=positions, k=3)
    assert result.top_tokens.shape == (model.cfg.n_layers, 3, 3, 3)
    with torch.no_grad():
        probs, tokens = model(batch)[:, positions].float().softmax(-1).topk(3, dim=-1)
    assert torch.equal(result.top_tokens[-1], tokens) and (result.top_probs[-1] - probs).abs().max() < 1e-5
    # reading the image (rows 0 and 1) moves what the cross-attention block's output predicts
    moved = (result.top_probs[first_cross] - result.top_probs[first_cross - 1]).abs().amax((-1, -2))
    assert (moved[:2] > 1e-4).all()
    with pytest.raises(ValueError, match="pass text `positions`"):  # the default (image positions) are keys here
        logit_lens(model, batch)


def test_fast_false_equals_hf_and_hooks_live(checkpoint, batch):
    path, hf = checkpoint
    slow = HookedVLM.from_pretrained_no_processing(str(path), fast=False)
    assert slow.fast is False
    with torch.no_grad():
        logits = slow(batch)
    for row in range(3):
        real = batch.attention_mask[row].bool()
        assert (logits[row, real] - _alone(slow, hf, row)).abs().max() < ATOL, row
    layer = slow.vlm_cfg.cross_attention_layers[0]
    names = [cross_attn_name(n, layer) for n in ("q", "k", "v", "pattern", "z")]
    names += [f"blocks.{layer}.hook_attn_gate", f"blocks.{layer}.hook_mlp_out", "hook_image_embeds",
              "blocks.1.attn.hook_pattern"]
    assert_hooks_live(slow, names, slow.prepare(PROMPTS[1], images=IMAGES[1]))


def test_cache_options_keep_the_cross_attention_keys_whole(model, batch):
    """cross_attn.hook_k / hook_v / k_norm are [batch, image_keys, ...]: pos_slice and image_tokens_only cut
    sequence positions only, so these stay whole (they were sliced on the key axis, or refused)."""
    with torch.no_grad():
        _, full = model.run_with_cache(batch)
        _, last = model.run_with_cache(batch, pos_slice=-1)
        _, images = model.run_with_cache(batch, image_tokens_only=True)
    layer = model.vlm_cfg.cross_attention_layers[0]
    keys = [f"blocks.{layer}.cross_attn.{n}" for n in ("hook_k", "hook_v", "k_norm.hook_normalized")]
    for name in keys:
        assert torch.equal(last[name], full[name]) and torch.equal(images[name], full[name])
    resid = f"blocks.{layer}.hook_resid_post"
    assert torch.equal(last[resid], full[resid][:, -1:])
    assert torch.equal(images[resid], full[resid][batch.image_mask])


def test_sequence_grid_tools_refuse_the_key_axis(model, batch):
    """attention_to_image and read_kv index sequence positions with the image grids; on a cross-attention
    model those grids are keys, so they read text tokens: refused, with where to look instead."""
    from vlm_lens import viz
    from vlm_lens.analysis.probing import read_kv

    one = model.prepare(PROMPTS[0], images=IMAGES[0])
    with pytest.raises(ValueError, match="cross_attn"):
        viz.attention_to_image(model, one)
    with pytest.raises(ValueError, match="cross_attn"):
        read_kv(model, one)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_split_qkv_input_leaves_the_vision_tower_alone(model, batch):
    """The flag gives the language model its per-head input hooks; Mllama's own vision blocks have none, so
    the tower keeps running (it failed with an einsum error) and the logits do not move."""
    with torch.no_grad():
        base = model(batch)
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            logits, cache = model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_q_input"))
        assert not model.vision.cfg.use_split_qkv_input
        assert "blocks.0.hook_q_input" in cache
        assert (logits - base).abs().max() <= 1e-4
    finally:
        model.set_use_split_qkv_input(False)
