"""HookedVLM equals Idefics3ForConditionalGeneration: tower, pixel shuffle, projection, every residual, logits and
greedy generation on a padded batch of images split into different numbers of tiles; the tile layout, its
markers and regions; errors and the analysis toolkit. Tiny seeded models saved as on the hub."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import HookedVLM
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens, patch_image_positions
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.idefics3.processor import Idefics3ImagesOnlyProcessor
from vlm_lens.architectures.idefics3.testing import (
    ATOL,
    FAKE_ID,
    GLOBAL_ID,
    PROMPTS,
    SIZES,
    hf_inputs,
    image,
    save_model,
    tiny_config,
)
from vlm_lens.architectures.idefics3.tiles import TileSpan, image_tiles
from vlm_lens.inputs import inputs_from_tokens
from vlm_lens.testing import assert_hooks_live, assert_language_model_matches_hf
from vlm_lens.testing import real_positions as real

TWO_IMAGES = "USER : <image> <image> what is this ? ASSISTANT :"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def batch(model):
    """Row 0: a wide (1x2 crops) and a tall image (2x1 crops); row 1: a square one (2x2 crops); left padding."""
    return model.prepare([TWO_IMAGES, PROMPTS[1]],
                         images=[[image(SIZES["wide"], 0), image(SIZES["tall"], 1)], [image(SIZES["square"], 2)]])


def test_checkpoint_loads_with_the_images_only_processor(model, batch):
    assert isinstance(model.processor, Idefics3ImagesOnlyProcessor)
    assert batch.pixel_values.shape == (2, 6, 3, 16, 16)  # 3 + 3 tiles in row 0; 5 tiles + one padding slot in row 1
    assert (batch.pixel_values[1, 5] == 0).all() and (batch.extras["pixel_attention_mask"][1, 5] == 0).all()
    assert batch.extras["tile_grid"].tolist() == [[1, 2], [2, 1], [2, 2]]
    assert batch.extras["image_sizes"].tolist() == [list(SIZES[k]) for k in ("wide", "tall", "square")]
    assert batch.layout.n_images == 11 and int(batch.image_mask.sum()) == 11 * 4


def _hf_vision(hf, inputs):
    """HF's tower on the real tiles: every layer's hidden state, post-layernorm, pixel shuffle, projection."""
    pixels, mask = inputs.pixel_values.flatten(0, 1), inputs.extras["pixel_attention_mask"].flatten(0, 1)
    keep = pixels.flatten(1).ne(0).any(1)
    patch = hf.config.vision_config.patch_size
    patch_mask = mask[keep].unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
    with torch.no_grad():
        out = hf.model.vision_model(pixel_values=pixels[keep], patch_attention_mask=patch_mask, output_hidden_states=True)
        shuffled = hf.model.connector.pixel_shuffle(out.last_hidden_state, hf.config.scale_factor)
        embeds = torch.cat(hf.model.get_image_features(inputs.pixel_values, inputs.extras["pixel_attention_mask"]
                                                       ).pooler_output)
    return out, shuffled, embeds


def test_vision_parity_stage_by_stage(model, hf, batch):
    out, shuffled, embeds = _hf_vision(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    assert len(out.hidden_states) == len(model.vision.blocks) + 1
    assert (cache["vision.hook_patch_embed"] + cache["vision.hook_pos_embed"] - out.hidden_states[0]).abs().max() <= ATOL
    for layer in range(len(model.vision.blocks)):
        assert (cache[f"vision.blocks.{layer}.hook_resid_post"] - out.hidden_states[layer + 1]).abs().max() <= ATOL
    last = cache[f"vision.blocks.{len(model.vision.blocks) - 1}.hook_resid_post"]
    with torch.no_grad():  # post_layernorm (TL's hook_normalized is before its weight and bias)
        assert (model.vision.ln_final(last) - out.last_hidden_state).abs().max() <= ATOL
    assert cache["hook_image_features"].shape == (11, 4, 4 * 16)
    assert (cache["hook_image_features"] - shuffled).abs().max() <= ATOL
    assert cache["hook_image_embeds"].shape == (11, 4, model.cfg.d_model)
    assert (cache["hook_image_embeds"].flatten(0, 1) - embeds).abs().max() <= ATOL


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
    assert torch.equal(ours, ref) and len(set(ours[:, -6:].flatten().tolist())) > 2
    assert fired == [11]


def test_images_without_splitting_match_hf(model, hf):
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 3)], [image(SIZES["tall"], 4)]],
                           do_image_splitting=False)
    assert inputs.extras["tile_grid"].tolist() == [[0, 0], [0, 0]] and inputs.layout.n_images == 2
    with torch.no_grad():
        ref = hf(**hf_inputs(inputs)).logits
        assert real(model(inputs) - ref, inputs).abs().max() <= ATOL


def test_padded_patches_match_hf(model, hf):
    """A hand-made pixel_attention_mask (the processor never pads a real tile): the masked patches shift the
    position ids and are masked as keys, as in HF."""
    inputs = model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 5)])
    mask = inputs.extras["pixel_attention_mask"].clone()
    mask[0, 0, :, 9:] = 0  # the first crop: columns 9.. are padding (patch columns 3.. : 1 px of patch 2 is real)
    with torch.no_grad():
        base = model(inputs)
        ours = model(inputs.tokens, pixel_values=inputs.pixel_values, pixel_attention_mask=mask)
        ref = hf(input_ids=inputs.tokens, pixel_values=inputs.pixel_values, pixel_attention_mask=mask).logits
    assert (ours - ref).abs().max() <= ATOL and (ours - base).abs().max() > 1e-2


def test_every_hook_fires_and_matters(model):
    inputs = model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 6)])
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.set_use_split_qkv_input(True)
    try:
        names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
        assert {"vision.hook_patch_embed", "vision.hook_pos_embed", "vision.blocks.1.attn.hook_pattern",
                "vision.ln_final.hook_normalized", "hook_image_features", "projector.hook_in", "projector.hook_out",
                "hook_image_embeds", "blocks.0.attn.hook_rot_q"} <= set(names)
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
    newline = model.tokenizer.convert_tokens_to_ids("\n")
    row_col = model.tokenizer.convert_tokens_to_ids([f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)])
    for image_index in range(3):
        tiles = [spans[i] for i in image_tiles(layout, image_index)]
        b, rows, cols = tiles[0].batch, *tiles[0].tiles
        for span in tiles:
            ids = tokens[b, span.markers].tolist()
            if span.tile is None:
                assert ids == [FAKE_ID, GLOBAL_ID, FAKE_ID]
            else:
                r, c = span.tile
                assert ids[:2] == [FAKE_ID, row_col[2 * r + c]]
                assert ids[2:] == ([newline] * (1 if r < rows - 1 else 2) if c == cols - 1 else [])
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
    path, _ = save_model(tmp_path_factory.mktemp("idefics3-0"), tiny_config(vision_config=dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=0, num_attention_heads=2, image_size=16,
        patch_size=4)), resample=0)
    return HookedVLM.from_pretrained_no_processing(str(path))


@pytest.mark.parametrize("box", [(0, 16, 8, 24), (8, 4, 16, 12)])
def test_a_region_changes_exactly_the_tokens_of_its_boxes(unmixed, box):
    """A 16x32 image: two crops at scale 1 and the global image at half width. Editing a region moves, at the
    first layer, exactly the tokens whose boxes it overlaps, in the crop and in the global image."""
    img = image((16, 32), 7)
    edited = np.array(img)
    top, left, bottom, right = box
    edited[top:bottom, left:right] = 255 - edited[top:bottom, left:right]
    clean, moved = unmixed.prepare(PROMPTS[0], images=[img]), unmixed.prepare(PROMPTS[0], images=[Image.fromarray(edited)])
    with torch.no_grad():
        _, a = unmixed.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
        _, b = unmixed.run_with_cache(moved, names_filter="blocks.0.hook_resid_pre")
    changed = set(((a["blocks.0.hook_resid_pre"] - b["blocks.0.hook_resid_pre"]).abs().amax(-1)[0] > 1e-6)
                  .nonzero().flatten().tolist())
    layout = clean.layout
    expected = {int(p) for i in image_tiles(layout, 0) for p in layout.positions_in_box(i, box)}
    assert changed == expected and len(expected) == 2 + (box[0] == 8)  # one or two crop tokens, one global


def test_hand_made_inputs_stacked_tiles_without_tile_grid(model, batch):
    """Tokens and the real tiles stacked [n_tiles, 3, H, W], no mask, no tile_grid: the same logits; each tile is
    then laid out as an image of its own."""
    keep = batch.pixel_values.flatten(0, 1).flatten(1).ne(0).any(1)
    tiles = batch.pixel_values.flatten(0, 1)[keep]
    with torch.no_grad():
        ours = model(batch.tokens, pixel_values=tiles, attention_mask=batch.attention_mask)
        assert real(ours - model(batch), batch).abs().max() <= ATOL
    layout = inputs_from_tokens(model, batch.tokens, tiles, batch.attention_mask).layout
    assert [(s.image, s.tile) for s in layout.spans] == [(i, None) for i in range(11)]
    assert [s.grid.tolist() for s in layout.spans] == [s.grid.tolist() for s in batch.layout.spans]


# ----------------------------------------------------------------------------------- errors
def test_errors_teach(model, batch):
    tokens, pixels, mask = batch.tokens, batch.pixel_values, batch.extras["pixel_attention_mask"]
    with pytest.raises(ValueError, match="image tokens but 10 image"):
        model(tokens, pixel_values=pixels[:, :5], pixel_attention_mask=mask[:, :5])
    with pytest.raises(ValueError, match="square tiles"):
        model(tokens, pixel_values=torch.ones(1, 11, 3, 20, 20))
    with pytest.raises(ValueError, match="tile_grid"):
        model(tokens, pixel_values=pixels, pixel_attention_mask=mask, tile_grid=torch.tensor([[1, 2], [2, 2], [2, 2]]))
    with pytest.raises(ValueError, match="pixel_attention_mask has shape"):
        model(tokens, pixel_values=pixels, pixel_attention_mask=mask[:, :, :8])
    with pytest.raises(ValueError, match="videos are not supported"):
        model.processor(text=PROMPTS[0], videos=[np.zeros((2, 16, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="placeholder"):
        model.prepare(PROMPTS[0], images=[image(SIZES["wide"], 0), image(SIZES["wide"], 1)])


def test_text_only_forward_and_chat_template(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL
    chat = model.prepare("what is this ?", images=[image(SIZES["wide"], 8)], chat=True)
    text = model.tokenizer.decode(chat.tokens[0])
    assert text.startswith("<s> USER :") and text.endswith("<end_of_utterance> \n ASSISTANT :")


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
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(16)), [0], [0], tower="vision"))
    assert torch.allclose(base[:, :first], ablated[:, :first], atol=1e-5) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last], atol=1e-5) and not torch.allclose(base[:, last], knocked[:, last])
    assert not torch.allclose(base, vision_knock)
    other = model.prepare(PROMPTS[0], images=[image(SIZES["square"], 10)])
    target = int(base[0, -1].argmax())
    result = patch_image_positions(model, one, other, lambda logits: logits[0, -1, target], image=tiles[-1])
    assert result.values.shape == (model.cfg.n_layers, 2, 2)
    two = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 11)], [image(SIZES["tall"], 12)]])
    readout = read_kv(model, two, layers=[0, 1])
    assert readout.features("k", 1).shape[:3] == (6, 2, 2)
    assert readout.features("image_features").shape == (6, 2, 2, 64)
