"""The `vlm-lens demo` report: one image and prompt through every view, written as a folder.

Default: the richest shipped model organism (``organism.available()[-1]``: ``scenes``; ``shapes`` in an
install without the scenes weights) on a held-out item it answers right. There the ground truth of every
patch is known, so the report also runs the seed studies (``vlm_lens.organism.studies``) on a few held-out
items: the object-ablation table, the logit-lens curve and the attention-knockout window curves.
``--model`` with ``--image`` reports on any model (no ground truth); ``--model`` with ``--organism`` runs an
organism's items and studies through another checkpoint of that organism (e.g. one you trained).
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_lens import analysis

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path
    model: str | None = None  # None: the organism's shipped weights
    organism: str | None = None  # None: the richest shipped organism, unless a custom --model is given
    image: str | None = None
    prompt: str | None = None
    device: str = "cpu"
    n_eval: int = 42  # held-out organism items the seed studies run on
    window: int = 3  # layers per knockout window


def _organism_name(cfg: DemoConfig) -> str | None:
    from vlm_lens import organism

    if cfg.organism is None and cfg.model is None and not organism.available():
        raise FileNotFoundError(
            "no organism's weights ship with this install; train one with `python -m vlm_lens.organism.train "
            "--organism shapes --out FOLDER` and pass --model FOLDER --organism shapes, or reinstall vlm_lens"
        )
    name = cfg.organism or (organism.available()[-1] if cfg.model is None else None)
    if name is None and cfg.image is None:
        raise ValueError("--image is required with --model (or --organism NAME, for that organism's items).")
    return name


def pick_item(model: Any, organism_name: str) -> Any:
    """The held-out ``colour_of_shape`` item with the most objects that the model answers right (found by
    scanning the test split; the first candidate when the model gets none right)."""
    from vlm_lens import organism

    data = organism.ShapesDataset(split="test", seed=0, size=70, organism=organism_name)
    candidates = sorted(
        (it for it in data if it.question_type == "colour_of_shape"), key=lambda it: -len(it.objects)
    )
    correct = analysis.evaluate(model, candidates).correct.tolist()
    item = next((it for it, ok in zip(candidates, correct) if ok), candidates[0])
    if not any(correct):
        logger.warning(
            "the model answers none of %d candidate items right; showing one it gets wrong", len(correct)
        )
    return item


def _load(cfg: DemoConfig) -> tuple[Any, Any, Any, str | None]:
    """(model, inputs, organism item or None, organism name or None)."""
    from PIL import Image

    from vlm_lens import HookedVLM, organism

    name = _organism_name(cfg)
    if cfg.model is None:
        model = organism.load(cfg.device, name=name)
    else:
        model = HookedVLM.from_pretrained(cfg.model, device=cfg.device)
    if cfg.image is None:
        item = pick_item(model, name)
        image, prompt = item.image, cfg.prompt or item.prompt
        if cfg.prompt:  # another question about the item's image: its answer and target are not this one's
            item = None
    else:
        item, image = None, Image.open(cfg.image).convert("RGB")
        prompt = cfg.prompt or "USER: <image>\nWhat is in the image? ASSISTANT:"
    return model, model.prepare(prompt, images=[image]), item, name


def run_studies(model: Any, organism_name: str, n_items: int, window: int) -> dict[str, Any]:
    """The seed studies on ``n_items`` held-out items (test split, seed 1; mean token from seed 2)."""
    from vlm_lens import organism
    from vlm_lens.organism import studies

    items = organism.ShapesDataset(split="test", seed=1, size=n_items, organism=organism_name)[:]
    mean = studies.mean_token(
        model, organism.ShapesDataset(split="test", seed=2, size=32, organism=organism_name)
    )
    return {
        "ablation": studies.object_ablation(model, items, mean),
        "logit_lens": studies.logit_lens_hits(model, items),
        "knockout": studies.knockout_windows(model, items, window=min(window, model.cfg.n_layers)),
    }


def _attention_figure(model: Any, inputs: Any, image: Any, cache: Any) -> Any:
    """Attention from the last position to the image, one panel per LM layer on a shared scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vlm_lens import viz

    n = model.cfg.n_layers
    cols = min(4, n)
    rows = math.ceil(n / cols)
    grids = [viz.attention_to_image(model, inputs, 0, layers=[layer], cache=cache) for layer in range(n)]
    top = float(max(g.max() for g in grids))
    fig = Figure(figsize=(3.1 * cols + 0.8, 3.1 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for layer, (ax, grid) in enumerate(zip(axes, grids)):
        viz.image_heatmap(
            image, grid, ax=ax, colorbar=False, vmin=0, vmax=top, grid=True, title=f"layer {layer}"
        )
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.colorbar(axes[0].images[-1], ax=axes[:n].tolist(), label="attention (mean over heads)")
    fig.suptitle("Attention from the answer position to each image patch", fontsize=14)
    return fig


def _line_figure(
    x: list,
    series: dict[str, tuple[list[float], str]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    baseline: float | None = None,
) -> Any:
    """One line per ``series`` entry (values, line style) over the labels ``x``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (values, style) in series.items():
        ax.plot(range(len(x)), values, style, marker="o", linewidth=2, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle=":", linewidth=2, label="no knockout")
    ax.set_xticks(range(len(x)), [str(v) for v in x])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel, fontsize=12)
    ax.set_ylabel(ylabel, fontsize=12)
    ax.set_title(title, fontsize=13)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    return fig


def _study_figures(results: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    from vlm_lens import viz

    lens, knockout = results["logit_lens"], results["knockout"]
    lens_fig = _line_figure(
        lens.layers,
        {
            "object patches: colour": (lens.object["colour"], "-"),
            "object patches: shape": (lens.object["shape"], "-"),
            "object patches: either": (lens.object["either"], "-"),
            "background patches: either": (lens.background["either"], "--"),
        },
        xlabel="LM layer (resid_post)",
        ylabel=f"fraction of patches (top-{lens.k})",
        title="Logit lens: does a patch's top-k name an object's colour or shape?",
    )
    windows = [f"{w[0]}-{w[-1]}" for w in knockout.windows]
    ring = f" (+{knockout.buffer} cell ring)" if knockout.buffer else ""
    series = {f"answer -/-> {name}{ring if name == 'object' else ''}": (values, "-")
              for name, values in knockout.accuracy.items()}
    knockout_fig = _line_figure(
        windows,
        series,
        xlabel="knocked-out LM layers",
        ylabel="accuracy",
        title="Attention knockout from the answer position",
        baseline=knockout.baseline,
    )
    viz.save_figure(lens_fig, out / "logit_lens_curve.png")
    viz.save_figure(knockout_fig, out / "knockout_windows.png")
    return [
        ("logit_lens_curve.png", "Logit lens: share of patches whose top-k tokens name their object's colour or "
         "shape, against the same test for each object at the background patches, averaged over the image's "
         "objects (the control: with a small vocabulary a top-k names a present object often by chance, so "
         "compare the two)"),
        ("knockout_windows.png", f"Accuracy with attention from the answer blocked, per layer window; 'object' is "
         f"the object's cells grown by {knockout.buffer} cell(s)"),
    ]


def run_demo(cfg: DemoConfig) -> Path:
    """Write the report into ``cfg.out`` and return the path of its ``index.html``."""
    from vlm_lens import viz

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=5, desc="vlm-lens demo")
    model, inputs, item, organism_name = _load(cfg)
    steps.update()
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            inputs, names_filter=lambda n: n.endswith(("hook_pattern", "hook_resid_post"))
        )
    answer = model.tokenizer.decode([int(logits[0, -1].argmax())]).strip()
    image = viz.pixels_to_image(model, inputs.pixel_values[0])
    grid_shape = tuple(inputs.layout.grid(0).shape)
    outline = None if item is None else item.target_mask
    title = "The input as the model sees it" + ("" if item is None else ": asked-about object outlined")
    viz.save_figure(
        viz.image_grid(image, grid_shape, outline=outline, title=title, size=6.0), out / "input.png"
    )
    viz.save_figure(_attention_figure(model, inputs, image, cache), out / "attention.png")
    steps.update()

    lens = analysis.logit_lens(model, inputs, k=5, cache=cache)
    viz.save_html(
        viz.logit_lens_page(
            image,
            lens.str_tokens(model.tokenizer, 0),
            lens.on_grid(0)[1].numpy(),
            layer_names=[f"layer {i}" for i in range(model.cfg.n_layers)],
            title="Logit lens on the visual tokens (hover a patch)",
            display_size=560,
        ),
        out / "logit_lens.html",
    )
    views = {
        "attention_lm.html": viz.attention_heads(
            model, inputs, model.cfg.n_layers - 1, cache=cache, collapse_image=True
        ),
        "attention_vision.html": viz.attention_heads(model, inputs, 0, tower="vision"),
    }
    for name, view in views.items():
        viz.save_html(view, out / name)  # circuitsvis's offline build: the report works without a network
    steps.update()

    results = run_studies(model, organism_name, cfg.n_eval, cfg.window) if organism_name else None
    steps.update()
    figures = _study_figures(results, out) if results else []
    steps.update()
    steps.close()
    summary = {
        "organism": organism_name,
        "model": cfg.model or f"the shipped {organism_name!r} organism",
        "prompt": model.tokenizer.decode(inputs.tokens[0][~inputs.image_mask[0]]),
        "answer": answer,
        "expected": getattr(item, "answer", None),
        "n_items": cfg.n_eval if results else None,
        "studies": {k: asdict(v) for k, v in results.items()} if results else None,
    }
    (out / "results.json").write_text(json.dumps(_finite(summary), indent=2, allow_nan=False))
    index = out / "index.html"
    index.write_text(_index_html(summary, results, figures, list(views)))
    return index


def _finite(value: Any) -> Any:
    """``value`` with NaN (a study row without items, e.g. a random control that did not fit) as None: JSON
    has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _html_table(markdown: str, table_id: str) -> str:
    """A Markdown table (as the studies' ``table()`` writes it) as an HTML table."""
    lines = [
        [html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
    ]
    head = "".join(f"<th>{c}</th>" for c in lines[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in lines[2:])
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1360px;color:#222;font-size:16px}
img{max-width:100%} figure{margin:0 12px 16px 0;display:inline-block;vertical-align:top}
figcaption{font-size:14px;color:#555} .top{display:flex;gap:24px;align-items:flex-start}
table{border-collapse:collapse;font-size:14px} td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left} iframe{width:640px;height:720px;border:1px solid #ccc}
code{background:#f4f4f4;padding:1px 4px}"""


def _index_html(summary: dict, results: dict | None, figures: list[tuple[str, str]], views: list[str]) -> str:
    esc = html.escape
    expected = (
        "" if summary["expected"] is None else f" (expected <b id='expected'>{esc(summary['expected'])}</b>)"
    )
    studies = ""
    if results:
        ablation = results["ablation"]
        studies = (
            f"<h2>Seed studies on {summary['n_items']} held-out items</h2>"
            f"<p id='n-items'>n = {summary['n_items']} held-out test items (seed 1); the ablation and knockout use the "
            f"{ablation.n_items} whose answer needs an object ({ablation.n_excluded} 'exists' items answered 'no' "
            "are left out). Mean ablation with the mean visual token of 32 other held-out images. Answers of two "
            "words count as right only when both are the argmax.</p>"
            "<h3>Object-token ablation (buffer = cells grown around the object)</h3>"
            f"{_html_table(ablation.table(), 'ablation')}"
            + "".join(
                f"<figure><img src='{n}' alt='{esc(c)}'><figcaption>{esc(c)}</figcaption></figure>"
                for n, c in figures
            )
        )
    links = "".join(f"<li><a href='{v}'>{v}</a></li>" for v in ["logit_lens.html", *views, "results.json"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vlm-lens demo</title>
<style>{_STYLE}</style></head><body><h1>vlm-lens demo</h1>
<p>Model: {esc(summary["model"])}<br>Prompt: <code>{esc(summary["prompt"])}</code><br>
Model answer: <b id="answer">{esc(summary["answer"])}</b>{expected}</p>
<div class="top"><figure><img src="input.png" alt="input image with its patch grid"></figure>
<iframe src="logit_lens.html" title="logit lens"></iframe></div>
<h2>Views</h2><ul>{links}</ul>
{studies}
<h2>Attention to the image</h2><figure><img src="attention.png" alt="attention per layer"></figure>
</body></html>"""
