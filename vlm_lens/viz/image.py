"""Heatmaps over the image: per-patch values drawn with matplotlib over the preprocessed picture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs
from vlm_lens.viz.attention import pattern_hook_name

Indices = int | Sequence[int] | torch.Tensor | np.ndarray | None
Number = float | int


def _image_processor(model: HookedVLM) -> Any:
    processor = getattr(model, "processor", None)
    if processor is None:
        raise ValueError(
            "This model has no processor, so its image normalisation is unknown; load it with "
            "from_pretrained or pass processor= to HookedVLM.from_hf."
        )
    return getattr(processor, "image_processor", processor)


def pixels_to_image(model: HookedVLM, pixel_values: Float[torch.Tensor, "channels height width"],
                    size: tuple[int, int] | None = None) -> Any:
    """Undo the processor's normalisation of one preprocessed image: ``pixel_values[i]`` -> PIL RGB image.

    This is the picture the model saw (resized and cropped), so patch (r, c) of the vision grid covers
    the same pixels in it as in the model. ``size`` (height, width) crops it to the image where the
    processor pads a batch's images to the largest (``model.pipeline.processed_size(inputs.extras, i)``, which
    the families whose processor pads answer); without it a padded image comes with its padding, and a grid drawn over it lands on wrong pixels.

    Example:
        >>> img = viz.pixels_to_image(model, inputs.pixel_values[0])
        >>> img.size, img.mode
        ((48, 48), 'RGB')
    """
    from PIL import Image

    ip = _image_processor(model)
    x = pixel_values.detach().float().cpu()
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(
            f"pixel_values has shape {tuple(x.shape)}; give one RGB image as [3, height, width], "
            "e.g. inputs.pixel_values[0] (a tiled image is [n_tiles, 3, height, width]: give one tile)."
        )
    if size is not None:
        x = x[:, : int(size[0]), : int(size[1])]
    if getattr(ip, "do_normalize", True):
        mean = torch.as_tensor(ip.image_mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(ip.image_std, dtype=torch.float32).reshape(-1, 1, 1)
        x = x * std + mean
    if getattr(ip, "do_rescale", True):
        x = x / float(getattr(ip, "rescale_factor", 1 / 255))
    arr = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def _rgb_array(image: Any) -> np.ndarray:
    """PIL image, [H, W, 3] or [3, H, W] array/tensor -> [H, W, 3] array."""
    if hasattr(image, "convert"):
        return np.asarray(image.convert("RGB"))
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image has shape {arr.shape}; give a PIL image or an RGB array as [H, W, 3].")
    return arr


def _value_grid(values: Any) -> np.ndarray:
    grid = (
        values.detach().float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=float)
    )
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(
            f"values has shape {grid.shape}; give one value per patch as [rows, cols] "
            "(e.g. attention_to_image(...) or a probe's per-patch scores)."
        )
    return grid


def _patch_ticks(ax: Any, n: int, length: Number, axis: str) -> None:
    step = max(1, n // 8)
    idx = np.arange(0, n, step)
    centres = (idx + 0.5) * length / n
    if axis == "x":
        ax.set_xticks(centres, [str(i) for i in idx])
    else:
        ax.set_yticks(centres, [str(i) for i in idx])


def _new_axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes): ``ax``'s, or a new figure with its own Agg canvas (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _draw_grid(ax: Any, rows: int, cols: int, width: Number, height: Number, outline: Any = None) -> None:
    """Patch borders over the image, and a red outline around each cell where ``outline`` is True."""
    from matplotlib.patches import Rectangle

    for c in range(1, cols):
        ax.axvline(c * width / cols, color="white", linewidth=0.8, alpha=0.7)
    for r in range(1, rows):
        ax.axhline(r * height / rows, color="white", linewidth=0.8, alpha=0.7)
    if outline is not None:
        for r, c in np.argwhere(np.asarray(outline, dtype=bool)):
            ax.add_patch(
                Rectangle(
                    (c * width / cols, r * height / rows),
                    width / cols,
                    height / rows,
                    fill=False,
                    edgecolor="#ff3b30",
                    linewidth=2.5,
                )
            )


def image_grid(
    image: Any,
    grid_shape: tuple[int, int],
    *,
    outline: Any = None,
    ax: Any = None,
    title: str | None = None,
    size: Number = 6.4,
) -> Any:
    """The image with its patch grid drawn over it (and the cells where ``outline`` is True outlined in
    red, e.g. an object's patch mask); returns the matplotlib ``Figure`` (``size`` inches a side).

    Example:
        >>> fig = viz.image_grid(item.image, item.target_mask.shape, outline=item.target_mask)
        >>> viz.save_figure(fig, "grid.png").name
        'grid.png'
    """
    rows, cols = grid_shape
    if outline is not None and np.asarray(outline).shape != (rows, cols):
        raise ValueError(
            f"outline has shape {np.asarray(outline).shape}; give a bool mask of the grid, {rows}x{cols}."
        )
    pixels = _rgb_array(image)
    fig, ax = _new_axes(ax, (size, size))
    height, width = pixels.shape[:2]
    ax.imshow(pixels, extent=(0, width, height, 0), interpolation="nearest")
    _draw_grid(ax, rows, cols, width, height, outline)
    _patch_ticks(ax, cols, width, "x")
    _patch_ticks(ax, rows, height, "y")
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    if title:
        ax.set_title(title)
    return fig


def image_heatmap(
    image: Any,
    values: Any,
    *,
    alpha: Number = 0.5,
    ax: Any = None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: Number | None = None,
    vmax: Number | None = None,
    colorbar: bool = True,
    grid: bool = False,
) -> Any:
    """Draw a per-patch value grid over the image; returns the matplotlib ``Figure``.

    ``values`` is [rows, cols] (tensor or array). The grid is stretched over the whole image, so cell
    (r, c) lies exactly over patch (r, c); ticks are patch indices, and ``grid=True`` draws the patch
    borders. Pass ``ax`` to draw into your own axes. No pyplot state is touched (the figure has its own
    Agg canvas).

    Example:
        >>> fig = viz.image_heatmap(img, viz.attention_to_image(model, inputs), title="last token")
        >>> viz.save_figure(fig, "attention.png").name
        'attention.png'
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    pixels, cells = _rgb_array(image), _value_grid(values)
    fig, ax = _new_axes(ax, (5.0, 4.2))
    height, width = pixels.shape[:2]
    extent = (0, width, height, 0)
    ax.imshow(pixels, extent=extent, interpolation="nearest")
    overlay = ax.imshow(
        cells, extent=extent, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest"
    )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    if grid:
        _draw_grid(ax, *cells.shape, width, height)
    _patch_ticks(ax, cells.shape[1], width, "x")
    _patch_ticks(ax, cells.shape[0], height, "y")
    ax.set_xlabel("patch column")
    ax.set_ylabel("patch row")
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04)
    return fig


def save_figure(fig: Any, path: str | Path, *, dpi: Number | None = None) -> Path:
    """Write a figure as PNG (at the figure's own dpi unless ``dpi`` is given); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi if dpi is not None else fig.dpi)
    return path


def _index_list(chosen: Indices, n: int, what: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    items = [int(chosen)] if isinstance(chosen, int) else [int(i) for i in torch.as_tensor(chosen).flatten()]
    if not items:
        raise ValueError(f"{what} is empty; give at least one, or None for all {n}.")
    bad = [i for i in items if not -n <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range: valid are 0..{n - 1} (negative counts from the end).")
    return [i % n for i in items]


def attention_to_image(
    model: HookedVLM,
    inputs: VLMInputs,
    image_index: int = 0,
    *,
    query_positions: Indices = None,
    layers: Indices = None,
    heads: Indices = None,
    cache: Any = None,
) -> Float[torch.Tensor, "rows cols"]:
    """Attention from the query positions to each patch of image ``image_index``, as its [rows, cols] grid.

    Averaged over ``query_positions`` (default: the last real token of the image's batch row), ``layers``
    (default: all) and ``heads`` (default: all) of the language model. Without ``cache`` the model runs
    once, caching only the needed patterns. Draw the result with ``image_heatmap``.

    Example:
        >>> grid = viz.attention_to_image(model, inputs, layers=[2, 3])
        >>> grid.shape, bool(item.target_mask.flatten()[grid.argmax()])  # peak on the square
        (torch.Size([3, 3]), True)
        >>> fig = viz.image_heatmap(viz.pixels_to_image(model, inputs.pixel_values[0]), grid)
    """
    inputs.layout.require_sequence_axis("attention_to_image")
    grid = inputs.layout.grid(image_index)
    batch = inputs.layout.batch_of(image_index)
    seq_len = inputs.tokens.shape[1]
    if query_positions is None:
        queries = [int(inputs.attention_mask[batch].nonzero().max())]
    else:
        queries = _index_list(query_positions, seq_len, "query_positions")
    layer_list = _index_list(layers, model.cfg.n_layers, "layers")
    head_list = _index_list(heads, model.cfg.n_heads, "heads")
    names = [pattern_hook_name(layer) for layer in layer_list]
    if cache is None:
        wanted = set(names)
        _, cache = model.run_with_cache(inputs, names_filter=lambda name: name in wanted)
    missing = [n for n in names if n not in cache]
    if missing:
        raise ValueError(
            f"The cache lacks {missing}; run model.run_with_cache(inputs) keeping these patterns."
        )
    patterns = torch.stack([cache[n][batch].detach().float().cpu() for n in names])  # [layers, heads, q, k]
    chosen = patterns[:, head_list][:, :, queries][..., grid.flatten()]
    return chosen.mean(dim=(0, 1, 2)).reshape(grid.shape)
