"""HookedVLM equals Qwen2_5_VLForConditionalGeneration: vision blocks, merger, 3-D positions, every residual,
logits and greedy generation; layout, errors and the analysis toolkit on a tiny seeded model."""

import einops
import pytest
import torch
from transformer_lens.components import GroupedQueryAttention
from transformers.vision_utils import get_vision_window_index

from vlm_lens import HookedVLM
from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.qwen2_5_vl.merger import PatchMerger
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
    image,
    save_qwen,
)
from vlm_lens.architectures.qwen2_5_vl.vision import QwenVisionMLP, full_mask
from vlm_lens.testing import assert_image_attention, assert_language_model_matches_hf
from vlm_lens.testing import real_positions as real


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_qwen(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def batch(model):
    """Two rows, images of different sizes (8 and 15 tokens), left padding."""
    return model.prepare(PROMPTS, images=[[image(SIZES["wide"], 0)], [image(SIZES["tall"], 1)]])


def test_components_are_ours_after_the_fast_path(model):
    assert all(b.attn.external_rotary is mrope_rotary for b in model.blocks)
    assert all(type(b.attn) is MaskedRotaryAttention and type(b.mlp) is QwenVisionMLP for b in model.vision.blocks)
    assert type(model.projector) is PatchMerger
    assert [b.attn.mask_fn is full_mask for b in model.vision.blocks] == [False, True, False]


def test_position_ids_match_get_rope_index(hf, batch):
    grids = batch.extras["image_grid_thw"]
    ours = rope_index(batch.tokens == IMAGE_TOKEN_ID, 2, grids, batch.attention_mask)
    ref, _ = hf.model.get_rope_index(batch.tokens, (batch.tokens == IMAGE_TOKEN_ID).long(), grids,
                                     attention_mask=batch.attention_mask)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours[1], ours[2])  # image rows and columns really differ


def _hf_vision_blocks(hf, inputs):
    """Each HF vision block's output in our layout: per image, patches in raster order."""
    grids, caught = inputs.extras["image_grid_thw"], {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, o))
               for i, b in enumerate(hf.model.visual.blocks)]
    try:
        with torch.no_grad():
            merged = hf.model.visual(inputs.pixel_values, grid_thw=grids).pooler_output
    finally:
        for h in handles:
            h.remove()
    vcfg = hf.config.vision_config
    window_index, _ = get_vision_window_index(grids, vcfg.spatial_merge_size, vcfg.window_size, vcfg.patch_size)

    def raster(x):  # HF runs the blocks in window order; undo it, then 2x2 blocks -> raster
        x = x.view(len(window_index), -1, x.shape[-1])[torch.argsort(window_index)].reshape(-1, x.shape[-1])
        return [einops.rearrange(xi, "(R C m1 m2) d -> (R m1 C m2) d", R=h // 2, C=w // 2, m1=2, m2=2)
                for xi, (_, h, w) in zip(x.split(grids.prod(-1).tolist()), grids.tolist())]

    return [raster(caught[i]) for i in range(len(caught))], merged


def test_vision_parity_stage_by_stage(model, hf, batch):
    blocks, merged = _hf_vision_blocks(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    for layer, images in enumerate(blocks):  # blocks 0 and 2 windowed, block 1 global
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert ours.shape[:2] == (2, 60)
        for i, ref in enumerate(images):
            assert (ours[i, :len(ref)] - ref).abs().max() <= ATOL, (layer, i)
    assert (cache["projector.hook_out"] - merged).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - merged).abs().max() <= ATOL
    assert cache["hook_image_features"].shape == (8 + 15, 4 * 16)
    # hook_pattern: raster order, zero outside the window (4x4 patches) in windowed blocks; padding rows
    # attend to themselves alone
    windowed, full = cache["vision.blocks.0.attn.hook_pattern"], cache["vision.blocks.1.attn.hook_pattern"]
    assert windowed.shape == (2, 2, 60, 60)
    row0 = windowed[0, :, 0, :32].reshape(2, 4, 8)  # image 0 is 4x8 patches: query (0, 0) sees rows 0-3, cols 0-3
    assert (row0[..., :4] > 0).all() and (row0[..., 4:] == 0).all()
    assert (full[0, :, :32, :32] > 0).all()
    assert_image_attention(full[0], 32)
    assert torch.allclose(windowed[1, :, :60].sum(-1), torch.ones(2, 60))


def test_language_model_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)


def test_tensors_by_hand_equal_hf(model, hf, batch):
    """Tokens, pixel_values and image_grid_thw by hand, no padding (only the second row)."""
    keep = batch.attention_mask[1].bool()
    tokens = batch.tokens[1:, keep]
    pixels, grids = batch.pixel_values[32:], batch.extras["image_grid_thw"][1:]
    with torch.no_grad():
        ours = model(tokens, pixel_values=pixels, image_grid_thw=grids)
        ref = hf(input_ids=tokens, pixel_values=pixels, image_grid_thw=grids,
                 mm_token_type_ids=(tokens == IMAGE_TOKEN_ID).long()).logits
    assert (ours - ref).abs().max() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf(model, hf, batch, use_cache):
    hf.generation_config.eos_token_id = None  # generate all 8 tokens, past any eos
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(batch), max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = model.generate(batch, max_new_tokens=8, use_past_kv_cache=use_cache, stop_at_eos=False)
    assert ours.shape == ref.shape == (2, batch.tokens.shape[1] + 8)
    assert torch.equal(ours, ref)


def test_processed_weights_match_log_probs(saved, hf, batch):
    model = HookedVLM.from_pretrained(str(saved[0]))
    assert model.cfg.normalization_type == "RMSPre" and model.blocks[0].attn.external_rotary is mrope_rotary
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


def test_layout_grids_markers_and_boxes(model, batch):
    layout = batch.layout
    assert [tuple(layout.grid(i).shape) for i in range(2)] == [(2, 4), (5, 3)]
    for i in range(2):
        b, (start, end) = layout.batch_of(i), layout.markers(i).tolist()
        assert batch.tokens[b, start] == VISION_START_ID and batch.tokens[b, end] == VISION_END_ID
        assert end - start - 1 == layout.grid(i).numel()
    boxes = layout.boxes(0)  # 20x30 image resized to 16x32: a token is 8x8 px there, 10x7.5 px in the original
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 10.0, 7.5], dtype=torch.float64))
    assert torch.allclose(boxes[-1], torch.tensor([10.0, 22.5, 20.0, 30.0], dtype=torch.float64))
    assert layout.positions_in_box(0, (0, 0, 5, 5)).tolist() == [int(layout.grid(0)[0, 0])]
    labels = model.to_str_tokens(batch)
    assert labels[1][int(layout.grid(1)[4, 2])] == "<img1 r4 c2>"


def test_bare_placeholder_is_wrapped_and_prompt_without_one_gets_the_image(model):
    inputs = model.prepare("what is this ?", images=[image(SIZES["square"], 2)])
    assert inputs.layout.grid(0).shape == (2, 2)
    start, end = inputs.layout.markers(0).tolist()
    assert inputs.tokens[0, start] == VISION_START_ID and inputs.tokens[0, end] == VISION_END_ID


def test_errors_teach(model, batch):
    tokens, pixels = batch.tokens, batch.pixel_values
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(tokens, pixel_values=pixels)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(tokens, pixel_values=pixels[:-4], image_grid_thw=batch.extras["image_grid_thw"])
    with pytest.raises(ValueError, match="still images"):
        model(tokens, pixel_values=pixels, image_grid_thw=torch.tensor([[2, 4, 8], [1, 10, 6]]))


def test_text_only_forward_equals_hf(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL


def test_analysis_toolkit_runs(model):
    one = model.prepare(f"USER : {IMAGE} what colour ? ASSISTANT :", images=[image(SIZES["tall"], 3)])
    lens = logit_lens(model, one, k=3)
    tokens, probs = lens.on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 5, 3, 3)
    with torch.no_grad():
        base = model(one)
        grid = one.layout.grid(0).flatten()
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        last = one.tokens.shape[1] - 1
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=model.cfg.n_layers))
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(60)), [0], [0], tower="vision"))
    first = int(grid.min())
    assert torch.allclose(base[:, :first], ablated[:, :first]) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last]) and not torch.allclose(base[:, last], knocked[:, last])
    assert not torch.allclose(base, vision_knock)
    two = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 4)], [image(SIZES["wide"], 5)]])
    readout = read_kv(model, two, layers=[0, 1])
    assert readout.features("rot_k", 1).shape == (2, 2, 4, model.cfg.d_head)
    assert readout.features("image_features").shape == (2, 2, 4, 64)


def test_mrope_attention_is_grouped_query_attention(model):
    assert isinstance(model.blocks[0].attn, GroupedQueryAttention)
    assert {"blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k", "vision.blocks.0.attn.hook_rot_q"} <= set(
        model.hook_dict)


def test_start_at_layer_is_refused_rather_than_silently_wrong(model, batch):
    resid = torch.zeros(*batch.tokens.shape, model.cfg.d_model)
    with pytest.raises(ValueError, match="start_at_layer"):
        model(resid, start_at_layer=1)
