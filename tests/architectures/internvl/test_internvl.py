"""HookedVLM equals InternVLForConditionalGeneration: InternViT (layer scale, CLS token), pixel shuffle, projector,
every residual, logits and greedy generation on a padded batch of images cut into different numbers of tiles (two
images in one prompt); tower variants (RMSNorm, final LayerNorm, no q/k/v bias, an earlier feature layer, a Llama
LM); the tile layout, its markers and regions; errors and the analysis toolkit. Tiny seeded models saved as on
the hub."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import HookedVLM
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens, patch_image_positions
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.internvl.config import internvl_configs
from vlm_lens.architectures.internvl.processor import InternVLImagesOnlyProcessor
from vlm_lens.architectures.internvl.testing import (
    ATOL,
    END_ID,
    IMAGE,
    PROMPTS,
    SIZES,
    START_ID,
    hf_inputs,
    image,
    save_model,
    tiny_config,
)
from vlm_lens.architectures.internvl.tiles import TileSpan, image_tiles
from vlm_lens.testing import assert_hooks_live, assert_language_model_matches_hf
from vlm_lens.testing import real_positions as real

TWO_IMAGES = f"USER : {IMAGE} {IMAGE} what is this ? ASSISTANT :"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def batch(model):
    """Row 0: a wide (1x2 crops) and a tall image (2x1 crops); row 1: a square one (2x2 crops); left padding."""
    return model.prepare([TWO_IMAGES, PROMPTS[1]],
                         images=[[image(SIZES["wide"], 0), image(SIZES["tall"], 1)], [image(SIZES["square"], 2)]])


def test_checkpoint_loads_with_the_images_only_processor(model, batch):
    assert isinstance(model.processor, InternVLImagesOnlyProcessor)
    assert batch.pixel_values.shape == (11, 3, 16, 16)  # 3 + 3 tiles in row 0, 5 in row 1
    assert batch.extras["tile_grid"].tolist() == [[1, 2], [2, 1], [2, 2]]
    assert batch.extras["image_sizes"].tolist() == [list(SIZES[k]) for k in ("wide", "tall", "square")]
    assert batch.layout.n_images == 11 and int(batch.image_mask.sum()) == 11 * 4
    assert (batch.attention_mask[1] == 0).sum() > 0


def test_prepare_pads_on_the_side_asked_for(model, batch):
    """InternVL's processor defaults to left padding in its own text kwargs, which beat the tokenizer's setting:
    padding_side="right" must still give right padding (extraction relies on it)."""
    images = [[image(SIZES["wide"], 0), image(SIZES["tall"], 1)], [image(SIZES["square"], 2)]]
    right = model.prepare([TWO_IMAGES, PROMPTS[1]], images=images, padding_side="right")
    lengths = right.attention_mask.sum(1)
    assert all(bool(right.attention_mask[b, :n].all()) and not right.attention_mask[b, n:].any()
               for b, n in enumerate(lengths.tolist()))
    assert lengths.tolist() == batch.attention_mask.sum(1).tolist()
    with torch.no_grad():
        left_logits, right_logits = model(batch), model(right)
    n = int(lengths[1])
    assert torch.allclose(right_logits[1, n - 1], left_logits[1, -1], atol=1e-4)


def _hf_vision(hf, inputs):
    """HF's tower (every hidden state), its pixel shuffle and the projector's output."""
    with torch.no_grad():
        out = hf.model.vision_tower(pixel_values=inputs.pixel_values, output_hidden_states=True)
        patches = out.last_hidden_state[:, 1:]
        side = round(patches.shape[1] ** 0.5)
        shuffled = hf.model.pixel_shuffle(patches.reshape(len(patches), side, side, -1), hf.config.downsample_ratio)
        embeds = hf.model.get_image_features(inputs.pixel_values).pooler_output
    return out, shuffled.flatten(1, 2), embeds


def test_vision_parity_stage_by_stage(model, hf, batch):
    out, shuffled, embeds = _hf_vision(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    assert len(out.hidden_states) == len(model.vision.blocks) + 1
    embedded = torch.cat([model.vision.class_embedding.expand(11, 1, -1), cache["vision.hook_patch_embed"]], 1)
    assert (embedded + cache["vision.hook_pos_embed"] - out.hidden_states[0]).abs().max() <= ATOL
    for layer in range(len(model.vision.blocks)):
        assert (cache[f"vision.blocks.{layer}.hook_resid_post"] - out.hidden_states[layer + 1]).abs().max() <= ATOL
    assert cache["hook_image_features"].shape == (11, 4, 4 * 16)
    assert (cache["hook_image_features"] - shuffled).abs().max() <= ATOL
    assert cache["hook_image_embeds"].shape == (11, 4, model.cfg.d_model)
    assert (cache["hook_image_embeds"] - embeds).abs().max() <= ATOL


def test_layer_scale_is_what_attn_out_adds(model, hf, batch):
    """hook_attn_out / hook_mlp_out are HF's lambda-scaled sub-layer outputs (the scale is folded into W_O, W_out)."""
    layer = hf.model.vision_tower.encoder.layer[0]
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith("vision.blocks.0."))
        x = cache["vision.blocks.0.hook_resid_pre"]
        attn = layer.lambda_1 * layer.attention(layer.layernorm_before(x))[0]
        mlp = layer.lambda_2 * layer.mlp(layer.layernorm_after(x + attn))
    assert (cache["vision.blocks.0.hook_attn_out"] - attn).abs().max() <= ATOL
    assert (cache["vision.blocks.0.hook_mlp_out"] - mlp).abs().max() <= ATOL
    assert not torch.allclose(layer.lambda_1, layer.lambda_1[0].expand_as(layer.lambda_1))  # seeded, not constant


def test_language_model_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)


def test_processed_weights_match_log_probs(saved, hf, batch):
    processed = HookedVLM.from_pretrained(str(saved[0]))
    assert processed.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        ours = processed(batch).log_softmax(-1)
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_and_the_tower_runs_once(model, hf, batch, use_cache):
    fired = []
    ours = model.generate(batch, max_new_tokens=6, use_past_kv_cache=use_cache, stop_at_eos=False,
                          fwd_hooks=[("vision.hook_patch_embed", lambda v, hook: fired.append(v.shape[0]))])
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(batch, padded=False), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref) and not torch.equal(ours[0, -6:], ours[1, -6:])  # rows generate differently
    assert fired == [11]


def test_single_tiles_match_hf(model, hf):
    """A small image is one tile (no thumbnail); crop_to_patches=False makes every image one tile."""
    small = model.prepare(PROMPTS[0], images=[image(SIZES["small"], 3)])
    unsplit = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 3)], [image(SIZES["tall"], 4)]],
                            crop_to_patches=False)
    assert small.extras["tile_grid"].tolist() == [[0, 0]] and small.layout.n_images == 1
    assert unsplit.extras["tile_grid"].tolist() == [[0, 0], [0, 0]] and unsplit.layout.n_images == 2
    with torch.no_grad():
        for inputs in (small, unsplit):
            assert real(model(inputs) - hf(**hf_inputs(inputs)).logits, inputs).abs().max() <= ATOL


VARIANTS = {
    # InternViT-6B-like: RMSNorm, qk-norm over all heads, no q/k/v bias; its final LayerNorm read (use_mean_pooling=False)
    "rms-qk-norm": dict(vision=dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False,
                                    use_mean_pooling=False, layer_norm_eps=1e-5)),
    # an earlier feature layer (the last block is never built) under a Llama language model
    "layer-2-llama": dict(vision=dict(num_hidden_layers=3), vision_feature_layer=-2,
                          text=dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_and_language_model_variants_match_hf(tmp_path, variant):
    spec = VARIANTS[variant]
    config = tiny_config(spec.get("text"), **spec["vision"])
    if "vision_feature_layer" in spec:
        config.vision_feature_layer = spec["vision_feature_layer"]
    path, hf = save_model(tmp_path, config)
    ours = HookedVLM.from_pretrained_no_processing(str(path))
    if variant == "layer-2-llama":
        assert len(ours.vision.blocks) == 2 and ours.cfg.original_architecture == "LlamaForCausalLM"
    else:
        assert ours.vision.cfg.normalization_type == "RMS" and hasattr(ours.vision, "ln_final")
    inputs = ours.prepare(PROMPTS, images=[[image(SIZES["wide"], 5)], [image(SIZES["small"], 6)]])
    with torch.no_grad():
        assert real(ours(inputs) - hf(**hf_inputs(inputs)).logits, inputs).abs().max() <= ATOL
    if variant == "rms-qk-norm":
        assert_hooks_live(ours, [n for n in ours.hook_dict if "_norm." in n or "ln_final" in n], inputs)


def test_every_hook_fires_and_matters(model):
    inputs = model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 6)])
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    try:
        names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
        assert {"vision.hook_patch_embed", "vision.hook_pos_embed", "vision.blocks.1.attn.hook_pattern",
                "vision.blocks.1.hook_attn_out", "hook_image_features", "projector.hook_in", "projector.ln.hook_normalized",
                "projector.hook_hidden", "projector.hook_out", "hook_image_embeds", "blocks.0.attn.hook_rot_q"} <= set(names)
        assert_hooks_live(model, names, inputs)
        model.set_use_split_qkv_input(False)
        model.vision.cfg.use_attn_in = True  # TL refuses hook_attn_in for the grouped-query LM
        assert_hooks_live(model, [n for n in model.hook_dict if n.startswith("vision.") and n.endswith("attn_in")],
                          inputs)
    finally:
        model.vision.cfg.use_attn_in = False
        for switch in (model.set_use_attn_result, model.set_use_hook_mlp_in, model.set_use_split_qkv_input):
            switch(False)


# ----------------------------------------------------------------------------------- layout
def test_layout_tiles_markers_and_labels(model, batch):
    layout, tokens = batch.layout, batch.tokens
    spans = layout.spans
    assert all(isinstance(s, TileSpan) for s in spans)
    assert [(s.image, s.tile) for s in spans[:6]] == [(0, (0, 0)), (0, (0, 1)), (0, None),
                                                     (1, (0, 0)), (1, (1, 0)), (1, None)]
    assert image_tiles(layout, 2) == list(range(6, 11)) and spans[10].tiles == (2, 2)
    assert all(tuple(layout.grid(i).shape) == (2, 2) for i in range(11))
    for image_index in range(3):
        tiles = [spans[i] for i in image_tiles(layout, image_index)]
        b, rows, cols = tiles[0].batch, *tiles[0].tiles
        assert tokens[b, tiles[0].markers].tolist() == [START_ID] and tokens[b, tiles[-1].markers].tolist() == [END_ID]
        assert all(len(s.markers) == 0 for s in tiles[1:-1])
        # markers and tiles together cover the image's whole expansion, nothing else
        covered = torch.cat([torch.cat([s.markers, s.grid.flatten()]) for s in tiles]).sort().values
        assert torch.equal(covered, torch.arange(int(covered[0]), int(covered[-1]) + 1))
        crops = layout.crop_grid(image_tiles(layout, image_index)[-1])
        assert crops.shape == (2 * rows, 2 * cols)
        assert torch.equal(crops[:2, -2:], tiles[cols - 1].grid)  # the first row's last crop, top right
    labels = model.to_str_tokens(batch)
    assert labels[1][int(layout.grid(10)[1, 0])] == "<img10 r1 c0>"
    assert labels[1][int(layout.grid(8)[0, 1])] == "<img10 crop r2 c1>"  # crop (1, 0), its cell (0, 1)
    assert layout.cell_of(int(layout.grid(1)[1, 1])) == (1, 1, 1)


@pytest.fixture(scope="module")
def unmixed(tmp_path_factory):
    """No vision block and nearest resizing: a token depends only on the pixels of its own patches."""
    path, _ = save_model(tmp_path_factory.mktemp("internvl-0"), tiny_config(num_hidden_layers=0), resample=0)
    return HookedVLM.from_pretrained_no_processing(str(path))


@pytest.mark.parametrize("box", [(0, 16, 8, 24), (8, 4, 16, 12)])
def test_a_region_changes_exactly_the_tokens_of_its_boxes(unmixed, box):
    """A 16x32 image: two crops at scale 1 and the thumbnail at half width. Editing a region moves, at the first
    layer, exactly the tokens whose boxes it overlaps, in the crop and in the thumbnail."""
    img = image((16, 32), 7)
    edited = np.array(img)
    top, left, bottom, right = box
    edited[top:bottom, left:right] = 255 - edited[top:bottom, left:right]
    clean = unmixed.prepare(PROMPTS[0], images=[img])
    moved = unmixed.prepare(PROMPTS[0], images=[Image.fromarray(edited)])
    assert clean.extras["tile_grid"].tolist() == [[1, 2]]
    with torch.no_grad():
        _, a = unmixed.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
        _, b = unmixed.run_with_cache(moved, names_filter="blocks.0.hook_resid_pre")
    changed = set(((a["blocks.0.hook_resid_pre"] - b["blocks.0.hook_resid_pre"]).abs().amax(-1)[0] > 1e-6)
                  .nonzero().flatten().tolist())
    layout = clean.layout
    expected = {int(p) for i in image_tiles(layout, 0) for p in layout.positions_in_box(i, box)}
    assert changed == expected and len(expected) == 2 + (box[0] == 8)  # one or two crop tokens, one thumbnail


# ----------------------------------------------------------------------------------- errors
def test_errors_teach_and_leave_the_model_unchanged(model, batch, hf):
    tokens, pixels = batch.tokens, batch.pixel_values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="image tokens but 10 image"):
        model(tokens, pixel_values=pixels[:10])
    with pytest.raises(ValueError, match="square tiles"):
        model(tokens, pixel_values=torch.ones(11, 3, 20, 20))
    with pytest.raises(ValueError, match="tile_grid"):
        model(tokens, pixel_values=pixels, tile_grid=torch.tensor([[1, 2], [2, 2], [2, 2]]))
    with pytest.raises(ValueError, match="videos are not supported"):
        model.processor(text=PROMPTS[0], videos=[np.zeros((2, 16, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="placeholder"):
        model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 0), image(SIZES["wide"], 1)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p._forward_hooks for p in model.hook_dict.values())
    for change, match in ((dict(vision_feature_select_strategy="full"), "CLS"), (dict(downsample_ratio=0.3), "1 / n"),
                          (dict(vision_feature_layer=[-1, -2]), "one layer")):
        config = tiny_config()
        for key, value in change.items():
            setattr(config, key, value)
        with pytest.raises(ValueError, match=match):
            internvl_configs(config, torch.float32, "cpu")


def test_text_only_forward_and_chat_template(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL
    chat = model.prepare("what is this ?", images=[image(SIZES["wide"], 8)], chat=True)
    text = model.tokenizer.decode(chat.tokens[0])
    assert text.startswith("USER : <img> <IMG_CONTEXT>") and text.endswith("</img> what is this? ASSISTANT :")


# ----------------------------------------------------------------------------------- analysis
def test_analysis_toolkit_runs(model):
    one = model.prepare(PROMPTS[0], images=[image(SIZES["square"], 9)])
    tiles = image_tiles(one.layout, 0)
    lens = logit_lens(model, one, k=3)
    assert lens.on_grid(tiles[-1])[0].shape == (model.cfg.n_layers, 2, 2, 3)
    with torch.no_grad():
        base = model(one)
        grid = one.layout.grid(tiles[1]).flatten()
        first = int(grid.min())
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        last = one.tokens.shape[1] - 1
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=model.cfg.n_layers))
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(17)), [0], [0], tower="vision"))
    assert torch.allclose(base[:, :first], ablated[:, :first], atol=1e-5) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last], atol=1e-5) and not torch.allclose(base[:, last], knocked[:, last])
    assert not torch.allclose(base, vision_knock)  # every patch stops reading the CLS token in vision block 0
    other = model.prepare(PROMPTS[0], images=[image(SIZES["square"], 10)])
    target = int(base[0, -1].argmax())
    result = patch_image_positions(model, one, other, lambda logits: logits[0, -1, target], image=tiles[-1])
    assert result.values.shape == (model.cfg.n_layers, 2, 2)
    two = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 11)], [image(SIZES["tall"], 12)]])
    readout = read_kv(model, two, layers=[0, 1])
    assert readout.features("k", 1).shape[:3] == (6, 2, 2)
    assert readout.features("image_features").shape == (6, 2, 2, 64)
