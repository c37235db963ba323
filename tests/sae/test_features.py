"""Feature maps over the image, top patches and the feature page (content and a real browser)."""

import base64
import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sae_helpers import PROMPTS, make_sae, rgb

from vlm_lens.sae import (
    feature_acts,
    feature_heatmap,
    feature_map,
    feature_page,
    patch_crop,
    scan_patches,
    top_patches,
)


@pytest.mark.parametrize("hook,d_in", [("blocks.1.hook_resid_pre", 32), ("vision.blocks.1.hook_resid_post", 24),
                                       ("hook_image_features", 24)])
def test_feature_map_is_the_encoded_activation_at_each_patch(sae_model, tiny_inputs, hook, d_in):
    sae = make_sae(hook, d_in, d_sae=16)
    with torch.no_grad():
        _, cache = sae_model.run_with_cache(tiny_inputs, names_filter=hook)
        encoded = sae.encode(cache[hook])
    layout = tiny_inputs.layout
    for image in range(layout.n_images):
        grid = layout.grid(image)
        if hook.startswith("blocks."):
            expected = encoded[layout.batch_of(image)][grid]  # [rows, cols, d_sae] through the layout
        else:  # the tower's tokens are the patches in row-major order, after CLS where the tower has one
            tokens = encoded[image]
            expected = tokens[len(tokens) - grid.numel():].reshape(*grid.shape, -1)
        for feature in (0, 7):
            assert torch.allclose(feature_map(sae_model, tiny_inputs, sae, feature, image), expected[..., feature], atol=1e-6)
    # attached, the SAE's own hook_sae_acts_post is read, and it is the same
    detached = feature_acts(sae_model, tiny_inputs, sae)
    with sae_model.saes([sae], use_error_term=True):
        assert torch.allclose(feature_acts(sae_model, tiny_inputs, sae), detached, atol=1e-6)


def test_feature_heatmap_and_errors(sae_model, tiny_inputs):
    sae = make_sae("blocks.1.hook_resid_pre", 32, d_sae=16)
    fig = feature_heatmap(sae_model, tiny_inputs, sae, 3, image_index=1)
    ax = fig.axes[0]
    assert "feature 3" in ax.get_title() and ax.images[1].get_array().shape == (4, 4)
    with pytest.raises(ValueError, match="out of range"):
        feature_map(sae_model, tiny_inputs, sae, 16)
    other = make_sae("blocks.1.hook_resid_pre", 32, d_sae=16, seed=5)
    with sae_model.saes([other]):
        with pytest.raises(ValueError, match="another SAE may be attached"):
            feature_map(sae_model, tiny_inputs, sae, 0)


def _items(n):
    return [SimpleNamespace(prompt=PROMPTS[i % 2], image=rgb(10 + i), index=i) for i in range(n)]


def test_top_patches_are_the_largest_values_of_the_scan(sae_model):
    sae = make_sae("blocks.1.hook_resid_pre", 32, d_sae=16)
    items = _items(7)
    scan = scan_patches(sae_model, sae, items, batch_size=3)
    assert scan.shape == (7, 4, 4, 16)
    hits = top_patches(sae_model, sae, 5, items, k=6, scan=scan)
    values = [h.activation for h in hits]
    assert values == sorted(values, reverse=True) and len(hits) == min(6, int((scan[..., 5] > 0).sum()))
    assert values[0] == pytest.approx(float(scan[..., 5].max()))
    for h in hits:
        assert float(scan[h.index, h.row, h.col, 5]) == pytest.approx(h.activation)


def test_patch_crop_outlines_the_patch():
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    crop = patch_crop(image, 0, 3, (4, 4), context=1, size=64)
    assert crop.size == (64, 64)  # patch rows 0-1 and columns 2-3 (the context is clipped at the edges)
    pixels = np.asarray(crop)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 59)
    cols, rows = np.nonzero(red.any(0))[0], np.nonzero(red.any(1))[0]
    assert cols.min() == 32 and cols.max() == 63 and rows.min() == 0 and rows.max() == 31


@pytest.fixture(scope="module")
def page(sae_model, tmp_path_factory):
    from vlm_lens import viz

    sae = make_sae("blocks.1.hook_resid_pre", 32, d_sae=16)
    items = _items(6)
    html = feature_page(sae_model, sae, 5, items, k=8, title="feature 5 <test>")
    return viz.save_html(html, tmp_path_factory.mktemp("page") / "feature.html"), html


def test_feature_page_content(page):
    _, html = page
    cards = re.findall(r'<figure class="crop" data-index="(\d+)" data-row="(\d+)" data-col="(\d+)"', html)
    assert len(cards) == 8
    data = json.loads(re.search(r'<script type="application/json" id="feature-data">(.*?)</script>', html).group(1))
    assert [(t["index"], t["row"], t["col"]) for t in data["top"]] == [tuple(map(int, c)) for c in cards]
    assert "feature 5 &lt;test&gt;" in html and "http" not in html  # escaped, and nothing to fetch
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        assert Image.open(io.BytesIO(base64.b64decode(uri))).size[0] > 0


def test_feature_page_renders_in_a_browser(page, tmp_path):
    from selenium.webdriver.common.by import By
    from test_demo import _browser, _not_blank  # the demo report's headless Chromium setup

    path, _ = page
    driver = _browser()
    try:
        driver.get(path.as_uri())
        crops = driver.find_elements(By.CSS_SELECTOR, "figure.crop img.crop-image")
        assert len(crops) == 8
        assert all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) > 0
                   for im in crops)
        assert all(im.is_displayed() and im.size["width"] > 50 for im in crops)
        shot = driver.get_screenshot_as_png()
        (tmp_path / "feature.png").write_bytes(shot)
        assert _not_blank(shot)
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
