"""A self-contained HTML page for the logit lens on an image's patches.

The page shows the image with its patch grid, a layer slider (``#layer``), each cell's top-1 token, and on
hover a tooltip (``#tooltip``) with the cell's top-k tokens and probabilities for the selected layer. No
network: the image is an embedded base64 PNG, CSS and JS are inline. Stable hooks for browser tests:
cells ``.cell[data-row][data-col]`` (top-1 text in ``.top1``), tooltip rows ``#tooltip .entry`` with
``.token`` and ``.prob``, the layer's name in ``#layer-name``, the data in ``script#lens-data`` (JSON).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_lens.viz.image import _rgb_array

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
#controls { margin: 8px 0 12px; display: flex; gap: 10px; align-items: center; }
#layer { width: 320px; }
#stage { position: relative; }
#image { position: absolute; left: 0; top: 0; image-rendering: pixelated; }
#grid { position: absolute; left: 0; top: 0; width: 100%; height: 100%; display: grid; }
.cell { box-sizing: border-box; border: 1px solid rgba(255,255,255,0.55); overflow: hidden;
        display: flex; align-items: center; justify-content: center; cursor: crosshair; }
.cell:hover { outline: 2px solid #ff3b30; z-index: 1; }
.top1 { color: #fff; text-shadow: 0 0 2px #000, 0 0 2px #000; white-space: nowrap; overflow: hidden;
        text-overflow: ellipsis; max-width: 100%; padding: 0 1px; }
#tooltip { position: fixed; background: #fff; border: 1px solid #888; border-radius: 4px; padding: 6px 8px;
           box-shadow: 0 2px 6px rgba(0,0,0,0.25); font-size: 13px; pointer-events: none; z-index: 10; }
#tooltip .where { font-weight: 600; margin-bottom: 4px; }
#tooltip .entry { display: flex; justify-content: space-between; gap: 14px; font-family: monospace; }
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("lens-data").textContent);
  var slider = document.getElementById("layer");
  var layerName = document.getElementById("layer-name");
  var tooltip = document.getElementById("tooltip");
  var cells = document.querySelectorAll(".cell");
  var hovered = null;
  function show(t) { t = t.replace(/\\n/g, "\\\\n"); return t.trim() === "" ? "\\u2423" : t; }
  function fill(cell) {
    var l = +slider.value, r = +cell.dataset.row, c = +cell.dataset.col;
    tooltip.textContent = "";
    var head = document.createElement("div");
    head.className = "where";
    head.textContent = "r" + r + " c" + c + " \\u00b7 " + data.layers[l];
    tooltip.appendChild(head);
    data.tokens[l][r][c].forEach(function (tok, i) {
      var row = document.createElement("div"), a = document.createElement("span"), b = document.createElement("span");
      row.className = "entry"; a.className = "token"; b.className = "prob";
      a.textContent = show(tok); b.textContent = data.probs[l][r][c][i].toFixed(3);
      row.appendChild(a); row.appendChild(b); tooltip.appendChild(row);
    });
  }
  function setLayer() {
    var l = +slider.value;
    layerName.textContent = data.layers[l];
    cells.forEach(function (cell) {
      var r = +cell.dataset.row, c = +cell.dataset.col;
      cell.querySelector(".top1").textContent = show(data.tokens[l][r][c][0]);
      cell.style.backgroundColor = "rgba(0, 90, 200, " + (0.6 * data.probs[l][r][c][0]).toFixed(3) + ")";
    });
    if (hovered) fill(hovered);
  }
  cells.forEach(function (cell) {
    cell.addEventListener("mouseenter", function () { hovered = cell; fill(cell); tooltip.hidden = false; });
    cell.addEventListener("mousemove", function (e) {
      tooltip.style.left = (e.clientX + 14) + "px"; tooltip.style.top = (e.clientY + 14) + "px";
    });
    cell.addEventListener("mouseleave", function () { hovered = null; tooltip.hidden = true; });
  });
  slider.addEventListener("input", setLayer);
  setLayer();
})();
"""


def _show(token: str) -> str:
    token = token.replace("\n", "\\n")
    return token if token.strip() else "\u2423"


def _check_shapes(top_tokens: Any, probs: np.ndarray, layer_names: Sequence[str] | None) -> list[str]:
    if probs.ndim != 4:
        raise ValueError(f"top_probs has shape {probs.shape}; expected [n_layers, rows, cols, k].")
    n_layers, rows, cols, k = probs.shape
    if len(top_tokens) != n_layers:
        raise ValueError(f"top_tokens has {len(top_tokens)} layers but top_probs has {n_layers}.")
    for layer, grid in enumerate(top_tokens):
        if len(grid) != rows or any(len(row) != cols for row in grid):
            raise ValueError(f"top_tokens[{layer}] is not a {rows}x{cols} grid like top_probs {probs.shape}.")
        for r, row in enumerate(grid):
            for c, cell in enumerate(row):
                if len(cell) != k:
                    raise ValueError(f"top_tokens[{layer}][{r}][{c}] has {len(cell)} tokens; top_probs has k={k}.")
    names = [f"layer {i}" for i in range(n_layers)] if layer_names is None else [str(n) for n in layer_names]
    if len(names) != n_layers:
        raise ValueError(f"layer_names has {len(names)} names for {n_layers} layers.")
    return names


def _png_base64(image: Any) -> tuple[str, int, int]:
    from PIL import Image

    pixels = _rgb_array(image)
    if pixels.dtype != np.uint8:
        scale = 255.0 if pixels.max() <= 1.0 else 1.0
        pixels = np.clip(pixels * scale, 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), pixels.shape[1], pixels.shape[0]


def _json_for_script(obj: Any) -> str:
    """JSON that cannot close its ``<script>`` element."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def logit_lens_page(image: Any, top_tokens: Sequence, top_probs: Any, *, layer_names: Sequence[str] | None = None,
                    title: str = "", display_size: int = 512) -> str:
    """A self-contained HTML page: the image with its patch grid, a layer slider, each cell's top-1
    token, and the cell's top-k tokens with probabilities on hover.

    ``top_tokens`` is a nested list [n_layers][rows][cols][k] of strings and ``top_probs`` an array or
    tensor [n_layers, rows, cols, k] (e.g. from ``vlm_lens.analysis.logit_lens``). The grid is stretched
    over the image, so cell (r, c) lies over patch (r, c). ``display_size`` is the image's longer side in
    CSS pixels.

    Example:
        >>> from vlm_lens.analysis.logit_lens import logit_lens
        >>> lens = logit_lens(model, inputs, k=3)
        >>> tokens, probs = lens.str_tokens(model.tokenizer, 0), lens.on_grid(0)[1]  # top-k per cell
        >>> page = viz.logit_lens_page(viz.pixels_to_image(model, inputs.pixel_values[0]), tokens, probs)
        >>> viz.save_html(page, "lens.html").name
        'lens.html'
    """
    probs = top_probs.detach().float().cpu().numpy() if torch.is_tensor(top_probs) else np.asarray(top_probs, float)
    names = _check_shapes(top_tokens, probs, layer_names)
    n_layers, rows, cols, _ = probs.shape
    tokens = [[[[str(t) for t in cell] for cell in row] for row in grid] for grid in top_tokens]
    png, width, height = _png_base64(image)
    scale = display_size / max(width, height)
    w, h = round(width * scale), round(height * scale)
    font = max(7, min(14, int(w / cols / 4)))
    esc = html_lib.escape
    cells = "\n".join(
        f'<div class="cell" data-row="{r}" data-col="{c}"><span class="top1">{esc(_show(tokens[0][r][c][0]))}'
        f"</span></div>"
        for r in range(rows) for c in range(cols)
    )
    data = {"layers": names, "rows": rows, "cols": cols, "tokens": tokens,
            "probs": np.round(probs, 5).tolist()}
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title or "logit lens")}</title>
<style>{_STYLE}</style>
</head>
<body>
<h2 id="title">{esc(title)}</h2>
<div id="controls">
<label for="layer">Layer</label>
<input type="range" id="layer" min="0" max="{n_layers - 1}" step="1" value="0">
<span id="layer-name">{esc(names[0])}</span>
</div>
<div id="stage" style="width: {w}px; height: {h}px;">
<img id="image" alt="input image" width="{w}" height="{h}" src="data:image/png;base64,{png}">
<div id="grid" style="grid-template-columns: repeat({cols}, 1fr); grid-template-rows: repeat({rows}, 1fr);
font-size: {font}px;">
{cells}
</div>
</div>
<div id="tooltip" hidden></div>
<script type="application/json" id="lens-data">{_json_for_script(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def save_html(html: Any, path: str | Path) -> Path:
    """Write an HTML page (a string, or a circuitsvis view with its JavaScript inlined so it works
    offline) to ``path``; returns the path."""
    text = getattr(html, "local_src", html)
    if not isinstance(text, str):
        raise ValueError(f"Expected an HTML string or a circuitsvis RenderedHTML, got {type(html).__name__}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
