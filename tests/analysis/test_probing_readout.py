"""Readout of image keys/values and vision features on the tiny GQA LLaVA (4x4 patch grid)."""

import pytest
import torch

from vlm_lens.analysis.probing import (
    KVReadout,
    iter_layers,
    linear_probe_segmentation,
    prepare_batches,
    query_segmentation,
    read_kv,
    text_features,
    with_prefix,
)

from .conftest import PROMPT, make_image


def test_readout_shapes_and_only_image_positions(raw_model, two):
    readout = read_kv(raw_model, two)
    cfg = raw_model.cfg
    n_kv, d_head = cfg.n_key_value_heads, cfg.d_head
    assert readout.layers == (0, 1) and n_kv < cfg.n_heads
    assert set(readout.data) == {(s, layer) for s in ("k", "rot_k", "v") for layer in (0, 1)} | {
        ("image_features", None), ("image_embeds", None)}
    assert readout.data[("k", 0)].shape == (2, 4, 4, n_kv, d_head)
    assert readout.features("v", 1).shape == (2, 4, 4, n_kv * d_head)
    assert readout.features("v", 1, head=1).shape == (2, 4, 4, d_head)
    assert readout.stack("rot_k").shape == (2, 2, 4, 4, n_kv * d_head)
    assert readout.stack("image_features").shape == (1, 2, 4, 4, raw_model.vlm_cfg.vision.d_model)
    assert readout.stack("image_embeds").shape == (1, 2, 4, 4, cfg.d_model)
    assert "before rotary" in readout.notes["k"] and "after rotary" in readout.notes["rot_k"]
    assert readout.data[("v", 0)].shape[:3].numel() == int(two.image_mask.sum())  # image grid cells only
    vision_only = read_kv(raw_model, two, sites=("image_features", "image_embeds"))  # stops before layer 0
    assert vision_only.layers == ()
    torch.testing.assert_close(vision_only.stack("image_embeds"), readout.stack("image_embeds"))


def test_readout_equals_cache_at_grid_positions(raw_model, two):
    readout = read_kv(raw_model, two)
    _, cache = raw_model.run_with_cache(two)
    for i in range(two.layout.n_images):
        b, grid = two.layout.batch_of(i), two.layout.grid(i)
        for layer in (0, 1):
            for site, hook in (("v", "hook_v"), ("k", "hook_k"), ("rot_k", "hook_rot_k")):
                expected = cache[f"blocks.{layer}.attn.{hook}"][b, grid]
                torch.testing.assert_close(readout.data[(site, layer)][i], expected)
        span = two.layout.spans[i]
        torch.testing.assert_close(readout.features("image_features")[i],
                                   cache["hook_image_features"][i, grid - span.start])
        torch.testing.assert_close(readout.features("image_embeds")[i], cache["hook_image_embeds"][i, grid - span.start])
        # the projector output is what the LM sees at the grid positions
        torch.testing.assert_close(readout.features("image_embeds")[i], cache["hook_embed"][b, grid])
    # rotary moves the keys: pre and post differ (but agree at norm, a rotation)
    k, rot = readout.features("k", 1), readout.features("rot_k", 1)
    assert not torch.allclose(k, rot, atol=1e-4)
    torch.testing.assert_close(readout.data[("k", 1)].norm(dim=-1), readout.data[("rot_k", 1)].norm(dim=-1))


def test_batches_concatenate_and_layers_stream(raw_model, one, two):
    both = read_kv(raw_model, [one, two], layers=[1], sites=("v",))
    assert both.n == 3 and both.layers == (1,)
    separate = read_kv(raw_model, two, layers=[1], sites=("v",))
    torch.testing.assert_close(both.features("v", 1)[1:], separate.features("v", 1))
    streamed = list(iter_layers(raw_model, [one, two], sites=("v",)))
    assert [layer for layer, _ in streamed] == [0, 1]
    torch.testing.assert_close(streamed[1][1].features("v", 1), both.features("v", 1))
    with pytest.raises(ValueError, match="not read"):
        both.features("k", 1)
    with pytest.raises(ValueError, match="layer 0 was not read"):
        both.features("v", 0)
    with pytest.raises(ValueError, match="unknown site"):
        read_kv(raw_model, one, sites=("q",))
    with pytest.raises(ValueError, match="out of range"):
        read_kv(raw_model, one, layers=[5])


def test_readout_under_an_intervention(raw_model, one):
    def zero_v(v, hook):
        return torch.zeros_like(v)

    hooked = read_kv(raw_model, one, layers=[0], sites=("v",), fwd_hooks=[("blocks.0.attn.hook_v", zero_v)])
    assert hooked.features("v", 0).abs().max() == 0


def test_text_query_features_and_query_segmentation(raw_model, two):
    queries = text_features(raw_model, ["cat", "red dog"], sites=("k", "v"))
    assert isinstance(queries, KVReadout)
    assert queries.stack("v").shape == (2, 2, raw_model.cfg.n_key_value_heads * raw_model.cfg.d_head)
    _, cache = raw_model.run_with_cache(raw_model.to_tokens("red dog"))
    torch.testing.assert_close(queries.data[("v", 1)][1], cache["blocks.1.attn.hook_v"][0, -1])
    image = read_kv(raw_model, two, sites=("v",))
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2] = True
    scores = query_segmentation(image.stack("v"), queries.stack("v"), masks)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()


def test_prefix_prompts_and_probe_on_tiny_model(raw_model):
    class Item:
        def __init__(self, seed):
            self.image, self.prompt = make_image(seed), PROMPT

    items = [Item(s) for s in range(6)]
    assert with_prefix(PROMPT, "red cat") == "USER : red cat <image>\nwhat is this ? ASSISTANT :"
    plain = prepare_batches(raw_model, items, batch_size=4)
    prefixed = prepare_batches(raw_model, items, batch_size=4, prompt=lambda it: with_prefix(it.prompt, "red cat"))
    assert [len(b) for b in plain] == [4, 2]
    a, b = read_kv(raw_model, plain, sites=("v",)), read_kv(raw_model, prefixed, sites=("v",))
    assert a.n == b.n == 6
    assert not torch.allclose(a.features("v", 1), b.features("v", 1))  # image values now see the prefix
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    masks[:, :, :2] = True
    assert linear_probe_segmentation(a.stack("v"), masks, n_train=3).shape == (2,)
    with pytest.raises(ValueError, match="placeholder"):
        with_prefix("no image here", "x")
