"""HookedVLM equals the models on a Pixtral tower: Mistral3ForConditionalGeneration (projector with a 2x2 patch
merger) and LlavaForConditionalGeneration with a Pixtral tower (Pixtral-12B's layout: no merger, LLaVA's
projector). Pixtral blocks, projector, every residual, logits and greedy generation; processor shim loaded as on
the hub, layout with [IMG_BREAK] and [IMG_END], hooks, errors and the analysis toolkit, on a tiny seeded model of
each. Both have the same token grids (8 px a token: 4-px patches merged 2x2, or 8-px patches), so one set of
tests serves both; what differs is in the tables below and in the tests named after one model."""

import json

import pytest
import torch
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from vlm_lens import HookedVLM
from vlm_lens._tl.components import MaskedRotaryAttention
from vlm_lens.analysis import (
    image_ablation_hooks,
    image_token_attribution,
    knockout_hooks,
    logit_lens,
    logit_target,
    patch_image_positions,
    top_attributed_positions,
)
from vlm_lens.analysis.probing import read_kv
from vlm_lens.architectures.llava.config import LlavaPixtralConfig, llava_configs
from vlm_lens.architectures.llava.pipeline import LlavaPipeline, LlavaPixtralPipeline
from vlm_lens.architectures.llava.testing import save_llava_pixtral, tiny_llava_pixtral_config
from vlm_lens.architectures.pixtral.config import mistral3_configs
from vlm_lens.architectures.pixtral.processor import PixtralImagesProcessor
from vlm_lens.architectures.pixtral.projector import Mistral3Projector
from vlm_lens.architectures.pixtral.testing import (
    ATOL,
    BREAK_ID,
    END_ID,
    IMAGE_TOKEN_ID,
    PROMPTS,
    SIZES,
    hf_inputs,
    image,
    save_mistral3,
    tiny_mistral3_config,
)
from vlm_lens.inputs import inputs_from_tokens
from vlm_lens.projector import LlavaProjector
from vlm_lens.testing import assert_hooks_live, assert_image_attention, assert_language_model_matches_hf
from vlm_lens.testing import real_positions as real

SAVERS = {"mistral3": save_mistral3, "llava": save_llava_pixtral}
PROJECTORS = {"mistral3": Mistral3Projector, "llava": LlavaProjector}
PROJECTOR_HOOKS = {"mistral3": ("projector.norm.hook_normalized", "projector.hook_merged"), "llava": ()}
only = {name: pytest.mark.parametrize("variant", [name], indirect=True) for name in SAVERS}


@pytest.fixture(scope="module", params=sorted(SAVERS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def saved(variant, tmp_path_factory):
    return SAVERS[variant](tmp_path_factory.mktemp(variant))


@pytest.fixture(scope="module")
def batch(model):
    """Row 0: a 3x4-token image; row 1: a 4x3-token and a 2x2-token image in one prompt; left padding."""
    return model.prepare(PROMPTS, images=[[image(SIZES["wide"], 0)], [image(SIZES["tall"], 1), image(SIZES["square"], 2)]])


def test_processor_shim_loads_the_hub_layout(saved, model, batch, variant):
    folder = saved[0]
    assert json.loads((folder / "processor_config.json").read_text())["processor_class"] == "PixtralProcessor"
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == "PixtralImageProcessor"
    assert type(model.processor) is PixtralImagesProcessor  # transformers' PixtralProcessor needs torchvision
    assert type(model.processor.image_processor) is PixtralImageProcessorPil
    assert model.processor.image_token_ids == [IMAGE_TOKEN_ID, BREAK_ID, END_ID]
    assert batch.extras["image_sizes"].tolist() == [[24, 32], [32, 24], [16, 16]]
    assert batch.pixel_values.shape == (3, 3, 32, 32)
    assert type(model.projector) is PROJECTORS[variant]
    assert all(type(b.attn) is MaskedRotaryAttention for b in model.vision.blocks)


def _patch_counts(hf, inputs) -> list[int]:
    return (inputs.extras["image_sizes"] // hf.config.vision_config.patch_size).prod(-1).tolist()


def _hf_vision(hf, inputs):
    """HF's tower hidden states split per image, and its image embeddings in sequence order."""
    with torch.no_grad():
        out = hf.model.vision_tower(inputs.pixel_values, image_sizes=inputs.extras["image_sizes"],
                                    output_hidden_states=True)
        embeds = hf.model.get_image_features(pixel_values=inputs.pixel_values,
                                             image_sizes=inputs.extras["image_sizes"]).pooler_output
    return [h[0].split(_patch_counts(hf, inputs)) for h in out.hidden_states], torch.cat(embeds)


def test_vision_parity_stage_by_stage(model, hf, batch):
    hidden, embeds = _hf_vision(hf, batch)
    counts = _patch_counts(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=lambda n: n.startswith(("vision.", "hook_image", "projector.")))
    n = len(model.vision.blocks)
    ours = [cache[f"vision.blocks.{i}.hook_resid_pre"] for i in range(n)] + [cache[f"vision.blocks.{n - 1}.hook_resid_post"]]
    for layer, (mine, images) in enumerate(zip(ours, hidden)):
        assert mine.shape[:2] == (3, max(counts))  # images are the batch, padded to the largest patch grid
        for i, ref in enumerate(images):
            assert (mine[i, :len(ref)] - ref).abs().max() <= ATOL, (layer, i)
            # no biases and RMS norms: a padding row that attends to itself alone stays zero
            assert (mine[i, len(ref):] == 0).all() or layer == 0
    assert (cache["projector.hook_out"] - embeds).abs().max() <= ATOL
    assert (cache["hook_image_embeds"] - embeds).abs().max() <= ATOL
    pattern, k = cache["vision.blocks.0.attn.hook_pattern"], counts[2]  # image 2's patches attend to themselves only
    assert_image_attention(pattern[2], k)  # nothing past its own patches; padding rows read themselves
    assert torch.allclose(pattern[2, :, :k].sum(-1), torch.ones(2, k))


@only["mistral3"]
def test_mistral3_patch_merger_parity(model, hf, batch):
    with torch.no_grad():
        out = hf.model.vision_tower(batch.pixel_values, image_sizes=batch.extras["image_sizes"],
                                    output_hidden_states=True)
        merged = hf.model.multi_modal_projector.patch_merger(
            hf.model.multi_modal_projector.norm(out.hidden_states[-1][0]), batch.extras["image_sizes"])
        _, cache = model.run_with_cache(batch, names_filter=["hook_image_features", "projector.hook_merged"])
    assert (cache["projector.hook_merged"] - merged).abs().max() <= ATOL
    assert cache["hook_image_features"].shape == (28, 4 * 16)  # a 2x2 block of 16-wide patches per token


@only["llava"]
def test_llava_dispatches_on_the_tower_and_features_are_hfs(model, hf, batch, raw_model):
    assert type(model.vlm_cfg) is LlavaPixtralConfig and model.vlm_cfg.spatial_merge_size == 1
    assert type(model.pipeline) is LlavaPixtralPipeline and model.vlm_cfg.select_strategy == "full"
    assert type(raw_model.pipeline) is LlavaPipeline  # a CLIP tower: LLaVA-1.5 as before
    assert type(raw_model.processor).__name__ == "LlavaProcessor"
    hidden, _ = _hf_vision(hf, batch)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter="hook_image_features")
    assert (cache["hook_image_features"] - torch.cat(hidden[-1])).abs().max() <= ATOL  # one patch, one token
    assert cache["hook_image_features"].shape == (28, 16)


@only["llava"]
def test_llava_feature_layer_list_equals_hf(tmp_path, batch):
    """Several feature layers, side by side as transformers concatenates them (0: the blocks' input)."""
    path, hf = save_llava_pixtral(tmp_path, tiny_llava_pixtral_config(vision_feature_layer=[0, -2, 1]))
    model = HookedVLM.from_pretrained_no_processing(str(path))
    assert len(model.vision.blocks) == 2  # the third block is never read
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch, names_filter="hook_image_features")
        ref = hf(**hf_inputs(batch)).logits
    assert cache["hook_image_features"].shape == (28, 3 * 16)
    assert real(logits - ref, batch).abs().max() <= ATOL


def test_language_model_parity(model, hf, batch):
    with torch.no_grad():
        ref = hf(**hf_inputs(batch), output_hidden_states=True)
        logits, cache = model.run_with_cache(batch)
    assert_language_model_matches_hf(model, cache, logits, ref.hidden_states, ref.logits, batch.attention_mask.bool(),
                                     ATOL)


def test_tensors_by_hand_equal_hf(model, hf, batch):
    """Tokens, pixel_values and image_sizes by hand, no padding: row 1 with its two images."""
    tokens = batch.tokens[1:, batch.attention_mask[1].bool()]
    pixels, sizes = batch.pixel_values[1:], batch.extras["image_sizes"][1:]
    with torch.no_grad():
        ours = model(tokens, pixel_values=pixels, image_sizes=sizes)
        ref = hf(input_ids=tokens, pixel_values=pixels, image_sizes=sizes).logits
    assert (ours - ref).abs().max() <= ATOL


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
    assert model.cfg.normalization_type == "RMSPre"
    with torch.no_grad():
        ref = hf(**hf_inputs(batch)).logits.log_softmax(-1)
        ours = model(batch).log_softmax(-1)
    assert real(ours - ref, batch).abs().max() <= ATOL


def test_every_hook_fires_and_matters(saved, batch, variant):
    model = HookedVLM.from_pretrained_no_processing(str(saved[0]))
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    names = [n for n in model.hook_dict if not n.endswith("hook_attn_in")]
    for required in ("vision.hook_patch_embed", "vision.ln_pre.hook_normalized", "vision.blocks.2.attn.hook_rot_k",
                     "vision.blocks.2.mlp.hook_pre_linear", "hook_image_features", "projector.hook_in",
                     "projector.hook_hidden", "projector.hook_out", "hook_image_embeds", "hook_embed",
                     "blocks.1.attn.hook_rot_q", *PROJECTOR_HOOKS[variant]):
        assert required in names
    assert_hooks_live(model, names, batch)


def test_layout_rows_breaks_end_and_boxes(model, batch):
    layout = batch.layout
    assert [tuple(layout.grid(i).shape) for i in range(3)] == [(3, 4), (4, 3), (2, 2)]
    assert [layout.batch_of(i) for i in range(3)] == [0, 1, 1]
    for i in range(3):
        row, grid = batch.tokens[layout.batch_of(i)], layout.grid(i)
        assert (row[grid] == IMAGE_TOKEN_ID).all()
        assert (row[layout.newlines(i)] == BREAK_ID).all() and len(layout.newlines(i)) == grid.shape[0] - 1
        assert layout.newlines(i).tolist() == (grid[:-1, -1] + 1).tolist()
        assert row[layout.markers(i)].tolist() == [END_ID] and int(layout.markers(i)) == int(grid[-1, -1]) + 1
    span = layout.spans[0]
    assert span.n_embeds == 12 and span.embed_rows(layout.grid(0)).flatten().tolist() == list(range(12))
    assert len(layout.image_positions(0)) == 12  # breaks are text, not image positions
    boxes = layout.boxes(0)  # 20x30 stretched to 24x32 (3x4 tokens): a token covers 20/3 x 7.5 px of the original
    assert torch.allclose(boxes[0], torch.tensor([0.0, 0.0, 20 / 3, 7.5], dtype=torch.float64))
    assert boxes[int(layout.newlines(0)[0]) - span.start].isnan().all()
    assert layout.positions_in_box(0, (0, 0, 5, 5)).tolist() == [int(layout.grid(0)[0, 0])]
    labels = model.to_str_tokens(batch)
    assert labels[1][int(layout.grid(1)[3, 2])] == "<img1 r3 c2>" and labels[1][int(layout.newlines(2)[0])] == "<img2 newline0>"


def test_one_region_moves_one_token(model, batch):
    """Pixels of image 0's token (1, 2) reach its patches only (2x2 merged, or 1); those reach that token only."""
    pixels = batch.pixel_values.clone()
    pixels[0, :, 8:16, 16:24] += 1.0
    p, m = model.vlm_cfg.vision.patch_size, model.vlm_cfg.spatial_merge_size
    cols = 32 // p  # image 0 is 24x32 px, its patches in raster order
    patches = torch.tensor([(1 * m + i) * cols + 2 * m + j for i in range(m) for j in range(m)])
    with torch.no_grad():
        _, base = model.run_with_cache(batch, names_filter=["vision.hook_patch_embed", "hook_image_embeds", "hook_embed"])
        _, moved = model.run_with_cache(inputs_from_tokens(model, batch.tokens, pixels, batch.attention_mask,
                                                           **batch.extras), names_filter="vision.hook_patch_embed")
        changed = (moved["vision.hook_patch_embed"] - base["vision.hook_patch_embed"]).abs().amax(-1) > 0
        assert changed.nonzero().tolist() == [[0, int(p)] for p in patches]

        def poke(x, hook):
            x = x.clone()
            x[0, patches] += 1.0
            return x

        with model.hooks(fwd_hooks=[("vision.blocks.2.hook_resid_post", poke)]):
            _, poked = model.run_with_cache(batch, names_filter=["hook_image_embeds", "hook_embed"])
    rows = (poked["hook_image_embeds"] - base["hook_image_embeds"]).abs().amax(-1) > 0
    assert rows.nonzero().flatten().tolist() == [1 * 4 + 2]
    where = (poked["hook_embed"] - base["hook_embed"]).abs().amax(-1) > 0
    assert where.nonzero().tolist() == [[0, int(batch.layout.grid(0)[1, 2])]]


def test_prompt_without_placeholder_gets_the_image_first(model):
    inputs = model.prepare("what is this ?", images=[image(SIZES["square"], 3)])
    assert inputs.layout.grid(0).shape == (2, 2) and int(inputs.layout.grid(0)[0, 0]) == 1


def test_errors_teach_and_leave_the_model_unchanged(model, batch):
    tokens, pixels, sizes = batch.tokens, batch.pixel_values, batch.extras["image_sizes"]
    with torch.no_grad():
        base = model(batch)
    with pytest.raises(ValueError, match="image_sizes"):
        model(tokens, pixel_values=pixels)
    with pytest.raises(ValueError, match="multiples of 8 px"):
        model(tokens, pixel_values=pixels, image_sizes=sizes + torch.tensor([[4, 0], [0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="exceed the pixel_values"):
        model(tokens, pixel_values=pixels[..., :16], image_sizes=sizes)
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(tokens, pixel_values=pixels[:2], image_sizes=sizes)
    flat = torch.tensor([[1, 7, 8] + [IMAGE_TOKEN_ID] * 12 + [9, 10]])  # no [IMG_BREAK] between the rows
    with pytest.raises(ValueError, match=r"\[IMG_BREAK\]"):
        inputs_from_tokens(model, flat, pixels[:1], image_sizes=sizes[:1])
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    with torch.no_grad():
        assert torch.equal(model(batch), base)


def test_mistral3_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="one int"):
        mistral3_configs(tiny_mistral3_config(vision_feature_layer=[-1, -2]), torch.float32, "cpu")


@only["llava"]
def test_llava_pixtral_config_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):  # no class token to drop
        llava_configs(tiny_llava_pixtral_config(vision_feature_select_strategy="default"), torch.float32,
                      "cpu")
    with pytest.raises(ValueError, match="set spatial_merge_size=1"):
        LlavaPixtralConfig(**{**vars(model.vlm_cfg), "spatial_merge_size": 2})


def test_text_only_forward_and_start_at_layer(model, hf):
    tokens = model.to_tokens("what is this ?")
    with torch.no_grad():
        assert (model(tokens) - hf(input_ids=tokens).logits).abs().max() <= ATOL
    one = model.prepare("USER : [IMG] what colour ? ASSISTANT :", images=[image(SIZES["tall"], 4)])
    with torch.no_grad():
        logits, cache = model.run_with_cache(one, names_filter="blocks.1.hook_resid_pre")
        resumed = model(cache["blocks.1.hook_resid_pre"], start_at_layer=1)
    assert (resumed - logits).abs().max() <= ATOL  # 1-D rotary, causal mask: the residual carries everything


def test_analysis_toolkit_runs(model):
    one = model.prepare("USER : [IMG] what colour ? ASSISTANT :", images=[image(SIZES["tall"], 4)])
    tokens, _ = logit_lens(model, one, k=3).on_grid(0)
    assert tokens.shape == (model.cfg.n_layers, 4, 3, 3)
    grid = one.layout.grid(0)
    first, last = int(grid.min()), one.tokens.shape[1] - 1
    with torch.no_grad():
        base = model(one)
        ablated = model.run_with_hooks(one, fwd_hooks=image_ablation_hooks(one, grid[1:].flatten(), "zero"))
        with model.hooks(fwd_hooks=image_ablation_hooks(one, grid[1:].flatten(), "zero")):
            _, embeds = model.run_with_cache(one, names_filter="hook_embed")
        knocked = model.run_with_hooks(one, fwd_hooks=knockout_hooks([last], grid.flatten(), "all", n_layers=2))
        # the language model is causal (no image-block mask): knocking out later keys changes nothing;
        # hooked runs take TransformerLens's own attention, so "nothing" is up to float noise (~1e-6)
        future = model.run_with_hooks(one, fwd_hooks=knockout_hooks([first], grid[1:].flatten(), "all", n_layers=2))
        n_patches = int(one.extras["image_sizes"][0].prod()) // model.vlm_cfg.vision.patch_size**2
        vision_knock = model.run_with_hooks(one, fwd_hooks=knockout_hooks(list(range(n_patches)), [0], [0],
                                                                          tower="vision"))
    ablated_rows = (embeds["hook_embed"][0] == 0).all(-1).nonzero().flatten()
    assert ablated_rows.tolist() == grid[1:].flatten().tolist()  # the breaks keep their own embeddings
    second_row = int(grid[1, 0])
    assert torch.allclose(base[:, :second_row], ablated[:, :second_row], atol=ATOL) and not torch.allclose(base, ablated)
    assert torch.allclose(base[:, :last], knocked[:, :last], atol=ATOL) and not torch.allclose(base[:, last], knocked[:, last])
    assert torch.allclose(base, future, atol=ATOL) and not torch.allclose(base, vision_knock)
    scores = image_token_attribution(model, one, logit_target(int(base[0, -1].argmax())))
    assert scores.shape == (12,)  # one per image embedding, none for the breaks
    top = top_attributed_positions(one, scores, 0, k=2)
    assert torch.isin(top, grid.flatten()).all() and scores.topk(2).values.min() == scores[
        one.layout.spans[0].embed_rows(top)].min()
    corrupted = model.prepare("USER : [IMG] what colour ? ASSISTANT :", images=[image(SIZES["tall"], 5)])
    patched = patch_image_positions(model, one, corrupted, lambda logits: logits[:, -1].max(), layers=[0, 1])
    assert patched.values.shape == (2, 4, 3) and torch.isfinite(patched.values).all()
    two = model.prepare(PROMPTS[:1] * 2, images=[[image(SIZES["wide"], 6)], [image(SIZES["wide"], 7)]])
    readout = read_kv(model, two, layers=[0, 1], sites=("k", "rot_k", "v", "image_features", "image_embeds"))
    assert readout.features("rot_k", 1).shape == (2, 3, 4, model.cfg.d_head)
    with torch.no_grad():
        _, cache = model.run_with_cache(two, names_filter=["hook_image_embeds", "hook_image_features"])
    assert torch.equal(readout.features("image_embeds"), cache["hook_image_embeds"].reshape(2, 3, 4, -1))
    assert torch.equal(readout.features("image_features"), cache["hook_image_features"].reshape(2, 3, 4, -1))
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_the_picture_of_a_padded_image_is_the_image_alone(model, batch):
    """The processor pads a batch's images to the largest: processed_size crops the picture back, so a grid
    drawn over it covers the pixels its tokens read."""
    import numpy as np

    from vlm_lens import viz

    alone = model.prepare(PROMPTS[0], images=[image(SIZES["square"], 2)])
    size = model.pipeline.processed_size(batch.extras, 2)
    picture = viz.pixels_to_image(model, batch.pixel_values[2], size=size)
    assert np.array_equal(np.asarray(picture), np.asarray(viz.pixels_to_image(model, alone.pixel_values[0])))
    assert viz.pixels_to_image(model, batch.pixel_values[2]).size != picture.size  # the padded canvas
