"""HookedVLM equals Qwen3VLForConditionalGeneration: vision blocks, projector, deepstack mergers, 3-D interleaved
positions, every residual (deepstack included), logits and greedy generation; hooks, layout, errors and the
analysis toolkit on a tiny seeded model loaded from a folder laid out as on the hub."""

import einops
import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens
from vlm_lens.analysis.ablation import embed_indices
from vlm_lens.analysis.patching import patch_image_positions
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.qwen2_5_vl.mrope import mrope_cos_sin, mrope_rotary, rope_index
from vlm_lens.architectures.qwen3_vl.ablation import deepstack_ablation_hooks
from vlm_lens.architectures.qwen3_vl.deepstack import DeepstackBlock
from vlm_lens.architectures.qwen3_vl.merger import Qwen3PatchMerger
from vlm_lens.architectures.qwen3_vl.mrope import interleaved_cos_sin
from vlm_lens.architectures.qwen3_vl.processor import Qwen3VLImageProcessor
from vlm_lens.architectures.qwen3_vl.testing import (
    ATOL,
    IMAGE,
    IMAGE_TOKEN_ID,
    PROMPTS,
    SIZES,
    VISION_END_ID,
    VISION_START_ID,
    hf_inputs,
    image,
    save_qwen3,
)
from vlm_lens.testing import assert_hooks_live, assert_image_attention
from vlm_lens.testing import real_positions as real


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def batch(model):
    """Row 0: two images (wide 2x4 tokens, square 2x2); row 1: one tall image (5x3); left padding."""
    images = [[image(SIZES["wide"], 0), image(SIZES["square"], 2)], [image(SIZES["tall"], 1)]]
    return model.prepare(PROMPTS, images=images)


def test_loaded_from_hub_layout_with_shimmed_processor(model, saved):
    assert (saved[0] / "video_preprocessor_config.json").exists()  # what AutoProcessor would need torchvision for
    assert type(model.processor) is Qwen3VLImageProcessor
    assert [type(b) is DeepstackBlock for b in model.blocks] == [True, True, False]
    assert all(b.attn.external_rotary is mrope_rotary for b in model.blocks)
    assert model.cfg.use_qk_norm and model.cfg.d_head == 16 != model.cfg.d_model // model.cfg.n_heads
    assert type(model.projector) is Qwen3PatchMerger and len(model.deepstack) == 2


def test_position_ids_match_get_rope_index(hf, batch):
    grids = batch.extras["image_grid_thw"]
    ours = rope_index(batch.tokens == IMAGE_TOKEN_ID, 2, grids, batch.attention_mask)
    ref, _ = hf.model.get_rope_index(batch.tokens, (batch.tokens == IMAGE_TOKEN_ID).long(), grids,
                                     attention_mask=batch.attention_mask)
    assert torch.equal(ours, ref)


def test_rotary_is_interleaved_as_hf(hf, batch):
    ids = rope_index(batch.tokens == IMAGE_TOKEN_ID, 2, batch.extras["image_grid_thw"], batch.attention_mask)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(torch.zeros(1), ids)
    cos, sin = interleaved_cos_sin(ids, 16, 10000.0, (2, 3, 3), torch.float32)
    assert (cos - ref_cos).abs().max() <= 1e-6 and (sin - ref_sin).abs().max() <= 1e-6
    chunked, _ = mrope_cos_sin(ids, 16, 10000.0, (2, 3, 3), torch.float32)  # Qwen2.5-VL's layout differs
    assert (chunked - ref_cos).abs().max() > 0.1


def _hf_vision(hf, inputs):
    """Each HF vision block's output in our layout (per image, patches in raster order), and the outputs."""
    grids, caught = inputs.extras["image_grid_thw"], {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: caught.__setitem__(i, o))
               for i, b in enumerate(hf.model.visual.blocks)]
    try:
        with torch.no_grad():
            out = hf.model.visual(inputs.pixel_values, grid_thw=grids)
    finally:
        for h in handles:
            h.remove()

    def raster(x):
        return [einops.rearrange(xi, "(R C m1 m2) d -> (R m1 C m2) d", R=h // 2, C=w // 2, m1=2, m2=2)
                for xi, (_, h, w) in zip(x.split(grids.prod(-1).tolist()), grids.tolist())]

    return [raster(caught[i]) for i in range(len(caught))], out


def test_vision_parity_stage_by_stage(model, hf, batch):
    blocks, out = _hf_vision(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.", "deepstack.")))
    for layer, images in enumerate(blocks):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert ours.shape[:2] == (3, 60)  # three images, padded to the tall one's 10x6 patches
        for i, ref in enumerate(images):
            assert (ours[i, :len(ref)] - ref).abs().max() <= ATOL, (layer, i)
    assert cache["hook_image_features"].shape == (8 + 4 + 15, 4 * 16)
    assert (cache["projector.hook_out"] - out.pooler_output).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - out.pooler_output).abs().max() <= ATOL
    assert len(out.deepstack_features) == 2
    for k, ref in enumerate(out.deepstack_features):
        assert (cache[f"deepstack.{k}.hook_out"] - ref).abs().max() <= ATOL
    pattern = cache["vision.blocks.0.attn.hook_pattern"]  # full attention inside each image, none to padding
    assert (pattern[0, :, :32, :32] > 0).all()
    assert_image_attention(pattern[0], 32)


def test_language_model_parity(model, hf, batch):
    """Our resid_post of layer l is the input of HF's layer l + 1: the decoder layer's output plus the deepstack
    features (which HF's hidden_states leave out)."""
    layers, inputs_of = hf.model.language_model.layers, {}
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: inputs_of.__setitem__(i, a[0]))
               for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            ref = hf(**hf_inputs(batch), output_hidden_states=True)
            logits, cache = model.run_with_cache(batch)
    finally:
        for h in handles:
            h.remove()
    assert real(cache["hook_embed"] - inputs_of[0], batch).abs().max() <= ATOL
    n = model.cfg.n_layers
    for layer in range(n - 1):
        assert real(cache[f"blocks.{layer}.hook_resid_post"] - inputs_of[layer + 1], batch).abs().max() <= ATOL, layer
    assert real(model.ln_final(cache[f"blocks.{n - 1}.hook_resid_post"]) - ref.hidden_states[-1],
                batch).abs().max() <= ATOL
    assert real(logits - ref.logits, batch).abs().max() <= ATOL
    for k in range(2):  # the deepstack term: the merger's output at the image positions, zero elsewhere
        term = cache[f"blocks.{k}.hook_deepstack"]
        assert torch.equal(term[batch.image_mask], cache[f"deepstack.{k}.hook_out"])
        assert not term[~batch.image_mask].any()
        parts = cache[f"blocks.{k}.hook_resid_mid"] + cache[f"blocks.{k}.hook_mlp_out"] + term
        assert torch.allclose(parts, cache[f"blocks.{k}.hook_resid_post"], atol=1e-6)


def test_deepstack_ablation_equals_hf_without_it(model, hf, batch):
    """Zeroing deepstack.{k}.hook_out is HF with its deepstack mergers' outputs zeroed: edits there reach the
    logits exactly as the model would use them."""
    zero = [("deepstack.0.hook_out", lambda v, hook: v * 0), ("deepstack.1.hook_out", lambda v, hook: v * 0)]
    handles = [m.register_forward_hook(lambda m, a, o: o * 0) for m in hf.model.visual.deepstack_merger_list]
    try:
        with torch.no_grad():
            ref = hf(**hf_inputs(batch)).logits
            ours = model.run_with_hooks(batch, fwd_hooks=zero)
            base = model(batch)
    finally:
        for h in handles:
            h.remove()
    assert real(ours - ref, batch).abs().max() <= ATOL
    assert real(base - ours, batch).abs().max() > 0.1  # deepstack matters on this model


def test_tensors_by_hand_equal_hf(model, hf, batch):
    """Tokens, pixel_values and image_grid_thw by hand, no padding (only the second row)."""
    keep = batch.attention_mask[1].bool()
    tokens = batch.tokens[1:, keep]
    pixels, grids = batch.pixel_values[32 + 16:], batch.extras["image_grid_thw"][2:]
    with torch.no_grad():
        ours = model(tokens, pixel_values=pixels, image_grid_thw=grids)
        ref = hf(input_ids=tokens, pixel_values=pixels, image_grid_thw=grids,
                 mm_token_type_ids=(tokens == IMAGE_TOKEN_ID).long()).logits
    assert (ours - ref).abs().max() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf_and_encodes_once(model, hf, batch, use_cache):
    hf.generation_config.eos_token_id = None  # generate all 6 tokens, past any eos
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(batch), max_new_tokens=6, do_sample=False, pad_token_id=0)
    fired = []
    count = [(name, lambda v, hook: fired.append(hook.name)) for name in
             ("vision.hook_patch_embed", "deepstack.1.hook_out", "blocks.1.hook_deepstack")]
    ours = model.generate(batch, max_new_tokens=6, use_past_kv_cache=use_cache, stop_at_eos=False, fwd_hooks=count)
    assert ours.shape == ref.shape == (2, batch.tokens.shape[1] + 6)
    assert torch.equal(ours, ref)
    steps = 1 if use_cache else 6  # with the cache only the prefill covers the image positions
    assert fired.count("vision.hook_patch_embed") == fired.count("deepstack.1.hook_out") == 1
    assert fired.count("blocks.1.hook_deepstack") == steps


def test_processed_weights_match_log_probs(saved, hf, batch):
    model = HookedVLM.from_pretrained(str(saved[0]))
    assert model.cfg.normalization_type == "RMSPre" and type(model.blocks[0]) is DeepstackBlock
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


def test_every_hook_fires_and_matters(model, batch):
    """Every hook, the optional ones switched on (``hook_attn_in`` in the vision tower only: TransformerLens
    refuses it for grouped-query attention)."""
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    try:
        model.set_use_split_qkv_input(True)
        names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
        assert {"vision.hook_patch_embed", "vision.hook_pos_embed", "vision.blocks.2.mlp.hook_post",
                "hook_image_features", "projector.ln_q.hook_normalized", "projector.hook_out", "hook_image_embeds",
                "deepstack.0.hook_in", "deepstack.1.ln_q.hook_normalized", "deepstack.1.hook_hidden",
                "deepstack.1.hook_out", "blocks.0.hook_deepstack", "blocks.1.hook_deepstack",
                "blocks.0.attn.q_norm.hook_normalized", "blocks.2.attn.hook_rot_k"} <= set(names)
        assert_hooks_live(model, names, batch)
        model.set_use_split_qkv_input(False)
        model.vision.cfg.use_attn_in = True
        names = [n for n in model.hook_dict if n.startswith("vision.") and n.endswith("hook_attn_in")]
        assert len(names) == 3
        assert_hooks_live(model, names, batch)
    finally:
        model.vision.cfg.use_attn_in = False
        for switch in (model.set_use_attn_result, model.set_use_hook_mlp_in, model.set_use_split_qkv_input):
            switch(False)


def test_layout_grids_markers_boxes_and_labels(model, batch):
    layout = batch.layout
    assert [tuple(layout.grid(i).shape) for i in range(3)] == [(2, 4), (2, 2), (5, 3)]
    assert [layout.batch_of(i) for i in range(3)] == [0, 0, 1]
    for i in range(3):
        b, (start, end) = layout.batch_of(i), layout.markers(i).tolist()
        assert batch.tokens[b, start] == VISION_START_ID and batch.tokens[b, end] == VISION_END_ID
        assert end - start - 1 == layout.grid(i).numel()
    boxes = layout.boxes(0)  # 20x30 resized to 16x32: a token is 8x8 px there, 10x7.5 px in the original
    assert torch.allclose(boxes[-1], torch.tensor([10.0, 22.5, 20.0, 30.0], dtype=torch.float64))
    labels = model.to_str_tokens(batch)
    assert labels[0][int(layout.grid(1)[1, 0])] == "<img1 r1 c0>" and labels[1][int(layout.grid(2)[4, 2])] == "<img2 r4 c2>"


@pytest.mark.parametrize("image_index, cell", [(0, (1, 2)), (2, (3, 0))])
def test_grid_cell_reaches_only_its_position(model, batch, image_index, cell):
    """Perturbing the projector's input for one grid cell (row k of hook_image_features) moves the first layer's
    input and the deepstack term only at ``layout.grid(i)[cell]``."""
    pos = int(batch.layout.grid(image_index)[cell])
    b = batch.layout.batch_of(image_index)
    row = int(embed_indices(batch, [torch.tensor([pos]) if r == b else torch.tensor([], dtype=torch.long)
                                    for r in range(2)])[0])

    def bump(value, hook):
        value = value.clone()
        value[row] += torch.linspace(-1.0, 1.0, value.shape[-1])  # not constant: the mergers' norms remove that
        return value

    names = ["blocks.0.hook_resid_pre", "blocks.0.hook_deepstack"]
    with torch.no_grad():
        _, base = model.run_with_cache(batch, names_filter=lambda n: n in names)
        with model.hooks(fwd_hooks=[("projector.hook_in", bump), ("deepstack.0.hook_in", bump)]):
            _, moved = model.run_with_cache(batch, names_filter=lambda n: n in names)
    for name in names:
        changed = (moved[name] - base[name]).abs().amax(-1) > 1e-6
        assert changed.nonzero().tolist() == [[b, pos]], name


def test_prepare_uses_the_chat_template_and_wraps_bare_placeholders(model):
    inputs = model.prepare("what is this ?", images=[image(SIZES["square"], 2)], chat=True)
    words = model.tokenizer.convert_ids_to_tokens(inputs.tokens[0])
    assert words[:3] == ["USER", ":", "<|vision_start|>"] and words[-2:] == ["ASSISTANT", ":"]
    bare = model.prepare("what is this ?", images=[image(SIZES["square"], 2)])
    start, end = bare.layout.markers(0).tolist()
    assert bare.tokens[0, start] == VISION_START_ID and bare.tokens[0, end] == VISION_END_ID


def test_errors_teach_and_leave_the_model_unchanged(model, batch):
    tokens, pixels, grids = batch.tokens, batch.pixel_values, batch.extras["image_grid_thw"]
    with torch.no_grad():
        before = model(batch)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model(tokens, pixel_values=pixels)
    row = tokens[1, batch.attention_mask[1].bool()]
    first = int((row == IMAGE_TOKEN_ID).nonzero()[0])
    short = torch.cat([row[:first], row[first + 1:]])[None]
    with pytest.raises(ValueError, match="14 image tokens but 1 image"):  # one image token too few
        model(short, pixel_values=pixels[48:], image_grid_thw=grids[2:])
    with pytest.raises(ValueError, match="still images"):
        model(tokens, pixel_values=pixels, image_grid_thw=torch.tensor([[2, 4, 8], [1, 4, 4], [1, 10, 6]]))
    with pytest.raises(ValueError, match="videos are not supported"):
        model.prepare(PROMPTS[1], images=[image(SIZES["square"])], videos=[[image(SIZES["square"])] * 2])
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(*tokens.shape, model.cfg.d_model), start_at_layer=1)
    with torch.no_grad():
        assert torch.equal(model(batch), before)


def test_text_only_forward_equals_hf(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL


def test_analysis_toolkit_runs(model):
    one = model.prepare(f"USER : {IMAGE} what colour ? ASSISTANT :", images=[image(SIZES["tall"], 3)])
    tokens, _ = logit_lens(model, one, k=3).on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 5, 3, 3)
    grid = one.layout.grid(0).flatten()
    first, last = int(grid.min()), one.tokens.shape[1] - 1
    with torch.no_grad():
        base = model(one)
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid, "zero"))
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid, "all", n_layers=model.cfg.n_layers))
        with model.hooks(fwd_hooks=knockout_hooks(list(range(15)), [0], [0], tower="vision")):
            vision_knock, cache = model.run_with_cache(one, names_filter="vision.blocks.0.attn.hook_pattern")
    assert torch.allclose(base[:, :first], ablated[:, :first]) and not torch.allclose(base, ablated)
    cells = grid[:3]  # the first image row: its tokens leave the deepstack path too, the others stay
    hooks = image_ablation_hooks(one, cells, "zero") + deepstack_ablation_hooks(one, cells, model.vlm_cfg.n_deepstack)
    with torch.no_grad():
        with model.hooks(fwd_hooks=hooks):
            _, gone = model.run_with_cache(one, names_filter=lambda n: n.endswith("hook_deepstack"))
        _, kept = model.run_with_cache(one, names_filter=lambda n: n.endswith("hook_deepstack"))
    for k in range(2):
        assert not gone[f"blocks.{k}.hook_deepstack"][0, cells].any()
        assert torch.equal(gone[f"blocks.{k}.hook_deepstack"][0, grid[3:]], kept[f"blocks.{k}.hook_deepstack"][0, grid[3:]])
    assert torch.allclose(base[:, :last], knocked[:, :last]) and not torch.allclose(base[:, last], knocked[:, last])
    assert not torch.allclose(base, vision_knock)
    assert (cache["vision.blocks.0.attn.hook_pattern"][0, 0, :15, 0] == 0).all()

    clean = model.prepare(PROMPTS[1], images=[image(SIZES["wide"], 4)])
    corrupt = model.prepare(PROMPTS[1], images=[image(SIZES["wide"], 5)])
    answer = int(model(clean)[0, -1].argmax())
    result = patch_image_positions(model, clean, corrupt, lambda logits: logits[0, -1, answer], layers=[0, 2])
    assert result.values.shape == (2, 2, 4) and torch.isfinite(result.values).all()
    two = model.prepare(PROMPTS[1:] * 2, images=[[image(SIZES["wide"], 4)], [image(SIZES["wide"], 5)]])
    readout = read_kv(model, two, layers=[0, 1])
    assert readout.features("rot_k", 1).shape == (2, 2, 4, 2 * model.cfg.d_head)
    assert readout.features("image_features").shape == (2, 2, 4, 64)
