"""circuitsvis attention views: labels, the collapsed image view, the vision tower."""

import pytest
import torch
from circuitsvis.utils.render import RenderedHTML

from vlm_lens import viz
from vlm_lens.viz.attention import attention_view_data


def test_attention_heads_lm_labels_in_html(raw_model, inputs, cache):
    view = viz.attention_heads(raw_model, inputs, 1, cache=cache)
    assert isinstance(view, RenderedHTML)
    for html in (str(view), view.local_src):
        for label in ("<img0 r0 c0>", "<img0 r3 c3>", "<img0 r2 c1>", "what", "ASSISTANT", "L1H0", "L1H3"):
            assert f'"{label}"' in html


def test_attention_view_matches_cache(raw_model, inputs, cache):
    pattern, labels = attention_view_data(raw_model, inputs, 0, cache=cache)
    assert labels == raw_model.to_str_tokens(inputs)
    torch.testing.assert_close(pattern, cache["blocks.0.attn.hook_pattern"][0])


def test_runs_the_model_when_no_cache(raw_model, inputs, cache):
    pattern, _ = attention_view_data(raw_model, inputs, -1)
    torch.testing.assert_close(pattern, cache["blocks.1.attn.hook_pattern"][0])


def test_collapsed_view_has_one_label_per_image(raw_model, make_image):
    inputs = raw_model.prepare("USER : <image> <image>\nwhat is this ? ASSISTANT :",
                               images=[make_image(1), make_image(2)])
    pattern, labels = attention_view_data(raw_model, inputs, 1, collapse_image=True)
    assert labels.count("<img0>") == 1 and labels.count("<img1>") == 1
    assert not any(label.startswith("<img0 r") or label.startswith("<img1 r") for label in labels)
    n_text = inputs.tokens.shape[1] - int(inputs.image_mask.sum())
    assert pattern.shape == (raw_model.cfg.n_heads, n_text + 2, n_text + 2)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]))
    view = viz.attention_heads(raw_model, inputs, 1, collapse_image=True)
    assert str(view).count('"<img0>"') == 1 and '"<img1>"' in str(view) and "<img0 r" not in str(view)


def test_collapse_sums_keys_and_averages_queries(raw_model, inputs, cache):
    pattern, labels = attention_view_data(raw_model, inputs, 0, cache=cache, collapse_image=True)
    full = cache["blocks.0.attn.hook_pattern"][0]
    span = inputs.layout.spans[0]
    img = labels.index("<img0>")
    last = full.shape[-1] - 1
    # text query -> image: summed over the image's keys
    torch.testing.assert_close(pattern[:, -1, img], full[:, last, span.start:span.end].sum(-1))
    # image -> text key before it (BOS): averaged over the image's queries
    torch.testing.assert_close(pattern[:, img, 0], full[:, span.start:span.end, 0].mean(-1))
    # text -> text unchanged
    torch.testing.assert_close(pattern[:, -1, -1], full[:, last, last])


def test_vision_tower_labels_and_pattern(raw_model, inputs, cache):
    pattern, labels = attention_view_data(raw_model, inputs, 1, tower="vision", cache=cache)
    assert labels[0] == "CLS" and labels[1] == "r0 c0" and labels[-1] == "r3 c3" and len(labels) == 17
    torch.testing.assert_close(pattern, cache["vision.blocks.1.attn.hook_pattern"][0])
    view = viz.attention_heads(raw_model, cache, 1, tower="vision")  # a cache alone is enough here
    assert '"CLS"' in str(view) and '"r2 c3"' in str(view) and "vision L1H0" in str(view)


def test_attention_patterns_view(raw_model, inputs, cache):
    view = viz.attention_patterns(raw_model, inputs, 0, cache=cache, collapse_image=True)
    assert isinstance(view, RenderedHTML) and '"<img0>"' in str(view) and "AttentionPatterns" in str(view)
    view = viz.attention_patterns(raw_model, inputs, 0, tower="vision", cache=cache)
    assert '"r1 c2"' in str(view)


def test_padded_row_drops_padding(raw_model, make_image):
    batch = raw_model.prepare(["USER : <image>\nwhat ?", "USER : <image>\ndescribe the image please ASSISTANT :"],
                              images=[[make_image(0)], [make_image(1)]])
    pattern, labels = attention_view_data(raw_model, batch, 0, batch=0)
    n_real = int(batch.attention_mask[0].sum())
    assert len(labels) == n_real < batch.tokens.shape[1] and pattern.shape[-1] == n_real
    assert "<pad>" not in labels


def test_errors_teach(raw_model, inputs, cache):
    with pytest.raises(ValueError, match="out of range"):
        viz.attention_heads(raw_model, inputs, 5, cache=cache)
    with pytest.raises(ValueError, match="need the inputs"):
        viz.attention_heads(raw_model, cache, 0)
    with pytest.raises(ValueError, match="collapse_image"):
        viz.attention_heads(raw_model, inputs, 0, tower="vision", collapse_image=True, cache=cache)
    with pytest.raises((ValueError, TypeError), match="tower"):  # beartype checks the Literal under pytest
        viz.attention_heads(raw_model, inputs, 0, tower="text", cache=cache)
