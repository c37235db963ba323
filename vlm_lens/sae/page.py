"""An offline HTML page of one SAE feature's top-activating patches across a set of images.

Each card is a crop of the image the model saw around the patch, enlarged with the patch outlined, with
its activation. No network: crops are embedded base64 PNGs and the CSS is inline. Stable hooks for browser
tests: cards ``figure.crop[data-index][data-row][data-col]`` holding ``img.crop-image`` and
``.activation``; the summary in ``#summary``; the data in ``script#feature-data`` (JSON).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
from collections.abc import Sequence
from typing import Any

import torch

from vlm_lens.sae.features import PatchHit, scan_patches, top_patches

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; max-width: 75em; }
#summary { margin: 8px 0 16px; }
#summary td, #summary th { padding: 2px 12px 2px 0; text-align: left; }
#crops { display: flex; flex-wrap: wrap; gap: 12px; }
figure.crop { margin: 0; padding: 6px; border: 1px solid #ccc; border-radius: 4px; background: #fafafa; }
img.crop-image { display: block; image-rendering: pixelated; }
figcaption { font-size: 13px; margin-top: 4px; max-width: 12em; }
.activation { font-family: monospace; font-weight: 600; }
.prompt { color: #555; font-size: 12px; overflow-wrap: anywhere; }
"""


def patch_crop(image: Any, row: int, col: int, grid_shape: tuple[int, int], *, context: int = 1,
               size: int = 160, outline: tuple[int, int, int] = (255, 59, 48)) -> Any:
    """The crop of ``image`` (a PIL image the patch grid covers exactly) around patch (row, col), with
    ``context`` patches on each side, enlarged (nearest neighbour) to ``size`` pixels on its longer side,
    with the patch outlined. Returns a PIL image."""
    from PIL import Image, ImageDraw

    rows, cols = grid_shape
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"patch ({row}, {col}) is outside the {rows}x{cols} grid.")
    width, height = image.size
    ph, pw = height / rows, width / cols
    r0, r1 = max(0, row - context), min(rows, row + context + 1)
    c0, c1 = max(0, col - context), min(cols, col + context + 1)
    box = (round(c0 * pw), round(r0 * ph), round(c1 * pw), round(r1 * ph))
    crop = image.convert("RGB").crop(box)
    scale = size / max(crop.size)
    crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.NEAREST)
    left, top = (col - c0) * pw * scale, (row - r0) * ph * scale
    line = max(2, size // 60)
    ImageDraw.Draw(crop).rectangle([left, top, left + pw * scale - 1, top + ph * scale - 1], outline=outline,
                                   width=line)
    return crop


def _png_data_uri(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _json_for_script(obj: Any) -> str:
    """JSON that cannot close its ``<script>`` element."""
    return json.dumps(obj).replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def feature_page(model: Any, sae: Any, feature: int, items: Sequence[Any], *, k: int = 12, context: int = 1,
                 crop_size: int = 160, batch_size: int = 32, title: str | None = None,
                 scan: torch.Tensor | None = None) -> str:
    """A self-contained HTML page of ``feature``'s ``k`` top-activating patches over ``items`` (objects with
    ``.prompt`` and ``.image``; each item's first image is scanned). Save it with ``viz.save_html``.

    Example:
        >>> page = feature_page(model, sae, 204, items, k=3)  # items: a sequence, e.g. list(ShapesDataset(...))
        >>> viz.save_html(page, "feature204.html").is_file()
        True
    """
    from vlm_lens import viz

    if scan is None:
        scan = scan_patches(model, sae, items, batch_size=batch_size)
    hits = top_patches(model, sae, feature, items, k=k, scan=scan)
    values = scan[..., feature]
    cards = []
    for hit in hits:
        item = items[hit.index]
        pixels = model.prepare(item.prompt, images=[item.image]).pixel_values[0]
        crop = patch_crop(viz.pixels_to_image(model, pixels), hit.row, hit.col, hit.grid_shape, context=context,
                          size=crop_size)
        cards.append(_card(hit, crop, item.prompt))
    hook = sae.cfg.metadata.hook_name
    esc = html_lib.escape
    title = title or f"SAE feature {feature} at {hook}"
    n_patches = values.numel()
    fires = float((values > 0).float().mean()) if n_patches else 0.0
    summary = {"hook": hook, "feature": feature, "d_sae": sae.cfg.d_sae, "items": len(items),
               "patches": n_patches, "fires_on": fires, "max": float(values.max()) if n_patches else 0.0,
               "top": [{"index": h.index, "row": h.row, "col": h.col, "activation": round(h.activation, 5)}
                       for h in hits]}
    rows = "".join(f"<tr><th>{esc(a)}</th><td>{esc(b)}</td></tr>" for a, b in [
        ("hook", hook), ("feature", f"{feature} of {sae.cfg.d_sae}"),
        ("scanned", f"{len(items)} images, {n_patches} patches"),
        ("fires on", f"{100 * fires:.1f} % of patches"), ("max activation", f"{summary['max']:.4g}")])
    body = "\n".join(cards) if cards else '<p id="no-hits">The feature does not fire on any scanned patch.</p>'
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h2 id="title">{esc(title)}</h2>
<table id="summary">{rows}</table>
<h3>Top {len(hits)} patches (outlined), strongest first</h3>
<div id="crops">
{body}
</div>
<script type="application/json" id="feature-data">{_json_for_script(summary)}</script>
</body>
</html>
"""


def _card(hit: PatchHit, crop: Any, prompt: str) -> str:
    esc = html_lib.escape
    alt = f"item {hit.index}, patch ({hit.row}, {hit.col})"
    return (f'<figure class="crop" data-index="{hit.index}" data-row="{hit.row}" data-col="{hit.col}" '
            f'data-activation="{hit.activation:.6g}">'
            f'<img class="crop-image" alt="{esc(alt)}" width="{crop.width}" height="{crop.height}" '
            f'src="{_png_data_uri(crop)}">'
            f'<figcaption><span class="activation">{hit.activation:.4g}</span> &middot; {esc(alt)}'
            f'<div class="prompt">{esc(prompt)}</div></figcaption></figure>')
