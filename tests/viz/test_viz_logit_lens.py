"""The self-contained logit-lens page."""

import base64
import html
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from vlm_lens import viz

WORDS = ["cat", "dog", "red", "blue", "square", "circle", "<s>", "\n"]


def lens_data(n_layers=3, rows=4, cols=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [[[[WORDS[(layer + r + c + j) % len(WORDS)] for j in range(k)] for c in range(cols)]
               for r in range(rows)] for layer in range(n_layers)]
    probs = np.sort(rng.dirichlet(np.ones(k + 2), size=(n_layers, rows, cols))[..., :k], axis=-1)[..., ::-1]
    return tokens, probs


def embedded(page):
    raw = re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S).group(1)
    return json.loads(raw)


def test_page_contents(make_image):
    image = make_image(4)
    tokens, probs = lens_data()
    page = viz.logit_lens_page(image, tokens, probs, layer_names=["L0", "L1", "L2"], title="lens <test>")
    assert page.startswith("<!DOCTYPE html>") and "<title>lens &lt;test&gt;</title>" in page
    # one cell per patch, each with its top-1 token of the first layer
    cells = re.findall(r'<div class="cell" data-row="(\d+)" data-col="(\d+)"><span class="top1">(.*?)</span>',
                       page)
    assert sorted((int(r), int(c)) for r, c, _ in cells) == [(r, c) for r in range(4) for c in range(4)]
    for r, c, text in cells:
        assert html.unescape(text) == tokens[0][int(r)][int(c)][0].replace("\n", "\\n")
    # the data behind the slider and the tooltip: every layer's tokens and probabilities
    data = embedded(page)
    assert data["tokens"] == tokens and data["layers"] == ["L0", "L1", "L2"]
    np.testing.assert_allclose(data["probs"], probs, atol=1e-5)
    for word in ("cat", "dog", "square"):
        assert f'"{word}"' in page
    # slider, tooltip, layer name
    assert re.search(r'<input type="range" id="layer" min="0" max="2"', page)
    assert 'id="tooltip"' in page and '<span id="layer-name">L0</span>' in page


def test_image_is_embedded_and_nothing_is_fetched(make_image):
    image = make_image(5, height=16, width=24)
    page = viz.logit_lens_page(image, *lens_data(rows=2, cols=3))
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    decoded = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(image))
    links = re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', page)
    assert links and not any("http" in link or link.startswith("//") for link in links)
    assert "http" not in page and "<link" not in page and "@import" not in page
    assert len(re.findall(r'class="cell"', page)) == 6


def test_script_data_cannot_break_out():
    tokens, probs = lens_data(n_layers=1, rows=1, cols=1, k=1)
    tokens[0][0][0][0] = "</script><script>alert(1)</script>"
    page = viz.logit_lens_page(np.zeros((8, 8, 3), dtype=np.uint8), tokens, probs)
    assert page.count("</script>") == 2 and "alert(1)" in page
    assert embedded(page)["tokens"] == tokens


def test_tensors_and_default_layer_names(make_image):
    import torch

    tokens, probs = lens_data(n_layers=2)
    page = viz.logit_lens_page(make_image(0), tokens, torch.tensor(probs.copy()))
    assert embedded(page)["layers"] == ["layer 0", "layer 1"]


def test_shape_errors(make_image):
    tokens, probs = lens_data()
    with pytest.raises(ValueError, match="layers"):
        viz.logit_lens_page(make_image(0), tokens[:2], probs)
    with pytest.raises(ValueError, match="k=2"):
        viz.logit_lens_page(make_image(0), tokens, probs[..., :2])
    with pytest.raises(ValueError, match="layer_names"):
        viz.logit_lens_page(make_image(0), tokens, probs, layer_names=["a"])
    with pytest.raises(ValueError, match="n_layers, rows, cols, k"):
        viz.logit_lens_page(make_image(0), tokens, probs[0])


def test_save_html(tmp_path, raw_model, inputs, cache, make_image):
    page = viz.logit_lens_page(make_image(0), *lens_data())
    path = viz.save_html(page, tmp_path / "out" / "lens.html")
    assert path.read_text(encoding="utf-8") == page
    view = viz.attention_heads(raw_model, inputs, 0, cache=cache)
    saved = viz.save_html(view, tmp_path / "heads.html").read_text(encoding="utf-8")
    assert saved == view.local_src and "unpkg.com" not in saved and '"<img0 r1 c1>"' in saved
