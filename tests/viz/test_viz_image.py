"""Heatmaps over the image: values, alignment of the grid with the patches, attention_to_image."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import viz


def _png_and_axes_box(fig, ax, path):
    """The PNG written by save_figure and the axes' drawing area in its pixel coordinates."""
    png = np.asarray(Image.open(viz.save_figure(fig, path)).convert("RGB")).astype(float)
    box = ax.get_window_extent()
    return png, (box.x0, png.shape[0] - box.y1, box.x1, png.shape[0] - box.y0)  # left, top, right, bottom


def test_pixels_to_image_undoes_the_processor(raw_model, make_image):
    original = make_image(3)
    inputs = raw_model.prepare("what ?", images=[original])  # 16x16: resize and crop are identities
    restored = viz.pixels_to_image(raw_model, inputs.pixel_values[0])
    assert restored.size == original.size and restored.mode == "RGB"
    diff = np.abs(np.asarray(restored, dtype=int) - np.asarray(original, dtype=int))
    assert diff.max() <= 1


def test_heatmap_draws_the_given_values(make_image):
    values = torch.arange(16.0).reshape(4, 4) / 10
    fig = viz.image_heatmap(make_image(0), values, alpha=0.4, title="my title")
    ax = fig.axes[0]
    base, overlay = ax.images
    np.testing.assert_allclose(np.asarray(overlay.get_array()), values.numpy())
    assert overlay.get_alpha() == 0.4 and overlay.get_cmap().name == "viridis"
    assert overlay.get_extent() == base.get_extent() == [0, 16, 16, 0]
    assert ax.get_title() == "my title" and len(fig.axes) == 2  # image axes + colorbar


@pytest.mark.parametrize("size,grid_shape,cell", [((16, 16), (4, 4), (1, 2)), ((16, 16), (4, 4), (3, 0)),
                                                  ((20, 40), (2, 5), (1, 3))])
def test_bright_cell_lies_over_its_patch(tmp_path, size, grid_shape, cell):
    height, width = size
    image = Image.new("RGB", (width, height), (60, 60, 60))
    values = np.zeros(grid_shape)
    values[cell] = 1.0
    fig = viz.image_heatmap(image, values)
    png, (left, top, right, bottom) = _png_and_axes_box(fig, fig.axes[0], tmp_path / "heat.png")
    assert right - left > 50 and bottom - top > 50
    inside = png[int(top) + 2:int(bottom) - 1, int(left) + 2:int(right) - 1].sum(-1)
    threshold = 0.5 * (inside.max() + inside.min())
    ys, xs = np.nonzero(png.sum(-1) > threshold)
    keep = (ys > top) & (ys < bottom) & (xs > left) & (xs < right)  # the axes, not the colorbar
    ys, xs = ys[keep], xs[keep]
    rows, cols = grid_shape
    cell_h, cell_w = (bottom - top) / rows, (right - left) / cols
    r, c = cell
    # the bright region is patch (r, c) of the image, to within a pixel of antialiasing
    assert top + r * cell_h - 1 <= ys.min() and ys.max() + 1 <= top + (r + 1) * cell_h + 1
    assert left + c * cell_w - 1 <= xs.min() and xs.max() + 1 <= left + (c + 1) * cell_w + 1
    assert len(ys) >= 0.9 * cell_h * cell_w


def test_heatmap_into_given_axes_and_save(tmp_path, make_image):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 2)
    out = viz.image_heatmap(make_image(1), np.ones((4, 4)), ax=ax, colorbar=False)
    assert out is fig and ax.images
    path = viz.save_figure(out, tmp_path / "sub" / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size == (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi))


def test_heatmap_rejects_bad_values(make_image):
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        viz.image_heatmap(make_image(0), np.zeros(16))
    with pytest.raises(ValueError, match="alpha"):
        viz.image_heatmap(make_image(0), np.zeros((4, 4)), alpha=2)


def test_image_grid_draws_patch_borders_and_outlines(tmp_path):
    image = Image.new("RGB", (96, 96), (20, 20, 20))
    outline = np.zeros((8, 8), dtype=bool)
    outline[2, 5] = outline[7, 0] = True
    fig = viz.image_grid(image, (8, 8), outline=outline, title="grid")
    ax = fig.axes[0]
    assert len(ax.lines) == 14 and len(ax.patches) == 2  # 7 + 7 inner borders, one box per outlined cell
    assert sorted(p.get_xy() for p in ax.patches) == [(0.0, 84.0), (60.0, 24.0)]
    png, (left, top, right, bottom) = _png_and_axes_box(fig, ax, tmp_path / "grid.png")
    x, y = int(left + (right - left) * 5.5 / 8), int(top + (bottom - top) * 2 / 8)  # top edge of cell (2, 5)
    red = png[y - 2:y + 3, x]
    assert (red[:, 0] > 200).any() and (red[:, 1] < 120).any()
    with pytest.raises(ValueError, match="8x8"):
        viz.image_grid(image, (8, 8), outline=np.zeros((3, 3), dtype=bool))


def _by_hand(cache, inputs, layers, heads, queries):
    grid = inputs.layout.grid(0)
    out = torch.zeros(grid.shape)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            vals = [float(cache[f"blocks.{layer}.attn.hook_pattern"][0, h, q, int(grid[r, c])])
                    for layer in layers for h in heads for q in queries]
            out[r, c] = sum(vals) / len(vals)
    return out


def test_attention_to_image_equals_hand_computation(raw_model, inputs, cache):
    last = inputs.tokens.shape[1] - 1
    got = viz.attention_to_image(raw_model, inputs)  # runs the model itself
    assert got.shape == (4, 4)
    torch.testing.assert_close(got, _by_hand(cache, inputs, [0, 1], range(4), [last]))
    got = viz.attention_to_image(raw_model, inputs, query_positions=[last - 1, -1], layers=1, heads=[0, 2],
                                 cache=cache)
    torch.testing.assert_close(got, _by_hand(cache, inputs, [1], [0, 2], [last - 1, last]))


def test_attention_to_image_errors(raw_model, inputs, cache):
    with pytest.raises(ValueError, match="layers"):
        viz.attention_to_image(raw_model, inputs, layers=[7], cache=cache)
    with pytest.raises(ValueError, match="out of range"):
        viz.attention_to_image(raw_model, inputs, image_index=1, cache=cache)
    with pytest.raises(ValueError, match="lacks"):
        viz.attention_to_image(raw_model, inputs, cache={})
