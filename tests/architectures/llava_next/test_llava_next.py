"""LLaVA-NeXT: HookedVLM equals LlavaNextForConditionalGeneration stage by stage; tiling layout; analysis."""

import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.analysis import image_ablation_hooks, knockout_hooks, logit_lens
from vlm_lens.architectures.llava_next.testing import (
    ATOL,
    PROMPT,
    PROMPTS,
    SIZES,
    assert_stages_match,
    changed_tokens,
    hf_inputs,
    image,
    load_pair,
    save_model,
    tiny_next_config,
)
from vlm_lens.layout import ImageLayout, ImageSpan


@pytest.fixture(scope="module")
def next_pair(tmp_path_factory):
    return load_pair(tmp_path_factory.mktemp("next"), tiny_next_config())


@pytest.mark.parametrize("shape", list(SIZES))
def test_parity_per_pinpoint(next_pair, shape):
    model, hf = next_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES[shape], seed=1)])
    assert_stages_match(model, hf, inputs)


def test_every_pinpoint_and_unpadding_is_exercised(next_pair):
    model, _ = next_pair
    plans = {name: model.pipeline.plans(model, {"image_sizes": torch.tensor([size])})[0] for name, size in SIZES.items()}
    assert {p.canvas for p in plans.values()} == {(16, 16), (16, 32), (32, 16), (32, 32)}
    assert plans["wide"].rows != (0, 4) and plans["tall"].cols != (0, 4)  # padding rows/columns were cut


def test_parity_batch_of_two_sizes(next_pair):
    model, hf = next_pair
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["wide"], 2)], [image(SIZES["square"], 3)]])
    assert inputs.needs_attention_mask and inputs.pixel_values.ndim == 5
    assert_stages_match(model, hf, inputs, padded=True)


def test_siglip_tower_with_mistral(tmp_path):
    model, hf = load_pair(tmp_path, tiny_next_config("siglip", "mistral", vision_feature_layer=[0, -1]))
    assert model.vlm_cfg.vision.family == "siglip" and not hasattr(model.vision, "ln_pre")
    assert_stages_match(model, hf, model.prepare(PROMPT, images=[image(SIZES["tall"], 4)]))


def test_processed_weights_match_log_probs(tmp_path):
    path, hf = save_model(tmp_path, tiny_next_config(lm="qwen2"), seed=2)
    model = HookedVLM.from_pretrained(str(path))
    inputs = model.prepare(PROMPT, images=[image(SIZES["wide"], 5)])
    with torch.no_grad():
        ours = model(inputs).log_softmax(-1)
        ref = hf(**hf_inputs(inputs)).logits.log_softmax(-1)
    assert (ours - ref).abs().max() <= ATOL


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_equals_hf(next_pair, use_cache):
    model, hf = next_pair
    inputs = model.prepare(PROMPTS, images=[[image(SIZES["tall"], 6)], [image(SIZES["small"], 7)]])
    ours = model.generate(inputs, max_new_tokens=5, use_past_kv_cache=use_cache)
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(inputs), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
    assert torch.equal(ours, ref)


# ----------------------------------------------------------------------------------- layout
def test_layout_lists_base_crops_and_newlines_apart(next_pair):
    model, _ = next_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES["wide"], 8)])
    layout, span = inputs.layout, inputs.layout.spans[0]
    base, crops, newlines = layout.grid(0), layout.crop_grid(0), layout.newlines(0)
    assert base.shape == (4, 4) and crops.shape == (2, 8) and len(newlines) == 2
    assert torch.equal(newlines, crops[:, -1] + 1)  # one newline after each crop row
    every = torch.cat([base.flatten(), crops.flatten(), newlines]).sort().values
    assert torch.equal(every, torch.arange(span.start, span.end))  # disjoint, covering the image's tokens
    assert torch.equal(span.extra, newlines) and set(layout.grids(0)) == {"base", "crops"}
    assert layout.boxes(0)[newlines - span.start].isnan().all()
    assert torch.isin(layout.image_positions(0), inputs.image_mask[0].nonzero().flatten()).all()
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=["hook_embed", "hook_image_embeds"])
    assert torch.equal(cache["hook_embed"][0, newlines], model.image_newline.detach().expand(2, -1))
    assert torch.equal(cache["hook_embed"][0, span.start:span.end], cache["hook_image_embeds"])


@pytest.fixture(scope="module")
def unmixed(tmp_path_factory):
    """Features read before any vision block (layer 0) and nearest resizing: a token depends only on
    the pixels of its own region, so a local edit shows exactly which tokens a region feeds."""
    path, _ = save_model(tmp_path_factory.mktemp("next0"), tiny_next_config(vision_feature_layer=0), resample=0)
    return HookedVLM.from_pretrained_no_processing(str(path))


@pytest.mark.parametrize("size, box", [((32, 8), (8, 4, 16, 8)), ((12, 40), (4, 8, 8, 20)),
                                       ((40, 12), (10, 0, 20, 6)), ((20, 20), (5, 5, 10, 10))])
def test_layout_regions_are_the_tokens_a_region_feeds(unmixed, size, box):
    layout, changed = changed_tokens(unmixed, image(size, 9), box)
    assert changed == set(layout.positions_in_box(0, box).tolist())
    assert changed & set(layout.grid(0).flatten().tolist()) and changed & set(layout.crop_grid(0).flatten().tolist())
    assert not changed & set(layout.newlines(0).tolist())


# ----------------------------------------------------------------------------------- analysis
def test_analysis_tools_accept_tiled_layouts(next_pair):
    model, _ = next_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES["square"], 10)])
    layout = inputs.layout
    lens = logit_lens(model, inputs, k=3)
    assert torch.equal(lens.positions[0], layout.image_positions(0))
    assert lens.on_grid(0)[0].shape == (model.cfg.n_layers, 4, 4, 3)
    crops = layout.crop_grid(0).flatten()
    assert torch.equal(logit_lens(model, inputs, positions=crops).positions[0], crops)

    with torch.no_grad():
        _, base = model.run_with_cache(inputs, names_filter="hook_embed")
        with model.hooks(fwd_hooks=image_ablation_hooks(inputs, crops, "zero")):
            _, ablated = model.run_with_cache(inputs, names_filter="hook_embed")
    moved = (base["hook_embed"] - ablated["hook_embed"]).abs().amax(-1)[0] > 0
    assert set(moved.nonzero().flatten().tolist()) == set(crops.tolist())
    assert (ablated["hook_embed"][0, crops] == 0).all()

    last = inputs.tokens.shape[1] - 1
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=knockout_hooks([last], crops, "all", n_layers=model.cfg.n_layers)):
        _, ko = model.run_with_cache(inputs, names_filter=names)
    for name in names:
        row = ko[name][0, :, last]
        assert (row[:, crops] == 0).all() and (row[:, layout.grid(0).flatten()] > 0).all()


def test_missing_or_mismatched_image_sizes_raise(next_pair):
    model, _ = next_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES["square"], 11)])
    with pytest.raises(ValueError, match="image_sizes"):
        model(inputs.tokens, pixel_values=inputs.pixel_values)
    sizes = inputs.extras["image_sizes"]
    with pytest.raises(ValueError, match="34 image features"):  # a wide image: fewer tokens than the square one
        model(inputs.tokens, pixel_values=inputs.pixel_values, image_sizes=torch.tensor([list(SIZES["wide"])]))
    with pytest.raises(ValueError, match=r"of \[5\] tiles"):
        model(inputs.tokens, pixel_values=inputs.pixel_values[0, :2], image_sizes=sizes)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_single_tile_layouts_have_no_crop_grid():
    layout = ImageLayout((ImageSpan(0, 0, 1, torch.zeros(1, 1, dtype=torch.long)),))
    with pytest.raises(ValueError, match="no crop grid"):
        layout.crop_grid(0)
    with pytest.raises(ValueError, match="no region map"):
        layout.positions_in_box(0, (0, 0, 1, 1))


def test_str_tokens_label_crops_and_newlines(next_pair):
    model, _ = next_pair
    inputs = model.prepare(PROMPT, images=[image(SIZES["wide"], 8)])
    labels = model.to_str_tokens(inputs)
    span = inputs.layout.spans[0]
    assert labels[int(span.crop_grid[0, 0])] == "<img0 crop r0 c0>"
    assert labels[int(span.newlines[0])] == "<img0 newline0>"
    assert labels[int(span.grid[0, 0])] == "<img0 r0 c0>"
