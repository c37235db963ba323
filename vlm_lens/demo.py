"""The `vlm-lens demo` report: one image and prompt through every view, written as a folder.

Default: the shipped model organism on a held-out item, where the ground truth of every patch is
known, so the report also scores ablation and knockout against that truth.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlm_lens import analysis

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: Path
    model: str | None = None  # None: the shipped organism
    image: str | None = None
    prompt: str | None = None
    device: str = "cpu"
    n_eval: int = 64  # organism items scored under ablation and knockout


def _load(cfg: DemoConfig) -> tuple[Any, Any, Any]:
    from PIL import Image

    from vlm_lens import HookedVLM, organism

    model = organism.load(cfg.device) if cfg.model is None else HookedVLM.from_pretrained(cfg.model, device=cfg.device)
    item = None
    if cfg.image is None:
        if cfg.model is not None:
            raise ValueError("--image is required with --model (the default images belong to the organism).")
        data = organism.ShapesDataset(split="test", seed=0, size=50)
        item = next(it for it in data if it.target_mask.any() and it.question_type == "colour_of_shape")
        image, prompt = item.image, cfg.prompt or item.prompt
    else:
        image = Image.open(cfg.image).convert("RGB")
        prompt = cfg.prompt or "USER: <image>\nWhat is in the image? ASSISTANT:"
    return model, model.prepare(prompt, images=[image]), item


def _ground_truth_scores(model: Any, n_eval: int) -> dict[str, Any]:
    from vlm_lens import organism

    items = [it for it in organism.ShapesDataset(split="test", seed=1, size=4 * n_eval) if it.target_mask.any()][:n_eval]
    mean_items = organism.ShapesDataset(split="test", seed=2, size=64)
    mean = analysis.mean_visual_token(model, [model.prepare([it.prompt for it in mean_items],
                                                            images=[[it.image] for it in mean_items])])
    last = None

    # Organism objects fill exactly one patch each, so their masks need no buffer (see the tests).
    def object_pos(inputs, batch, buffer=0):
        return [analysis.object_positions(inputs.layout, b, it.target_mask, buffer=buffer) for b, it in enumerate(batch)]

    def random_pos(inputs, batch, buffer=0):
        out = []
        for b, it in enumerate(batch):
            n = len(analysis.object_positions(inputs.layout, b, it.target_mask, buffer=buffer))
            occupied = np.any([obj.patch_mask for obj in it.objects], axis=0)
            out.append(analysis.background_positions(inputs.layout, b, n, occupied, seed=b))
        return out

    def ablate(select):
        return lambda inputs, batch: analysis.image_ablation_hooks(inputs, select(inputs, batch), "mean", mean=mean)

    def knockout(select):
        def hooks(inputs, batch):
            nonlocal last
            last = inputs.tokens.shape[1] - 1
            return analysis.knockout_hooks([last], select(inputs, batch), "all", n_layers=model.cfg.n_layers)
        return hooks

    base = analysis.evaluate(model, items)
    runs = {"ablate object": ablate(object_pos), "ablate random background": ablate(random_pos),
            "knock out answer->object": knockout(object_pos), "knock out answer->background": knockout(random_pos)}
    scores = {"baseline": base.accuracy}
    for name, hooks in tqdm(runs.items(), desc="ground-truth checks", leave=False):
        scores[name] = analysis.evaluate(model, items, hooks=hooks).accuracy
    return {"n_items": len(items), "accuracy": scores}


def run_demo(cfg: DemoConfig) -> Path:
    """Write the report into ``cfg.out`` and return the path of its ``index.html``."""
    from vlm_lens import viz

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=6, desc="vlm-lens demo")
    model, inputs, item = _load(cfg)
    steps.update()
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(("hook_pattern", "hook_resid_post")))
    answer = model.tokenizer.decode([int(logits[0, -1].argmax())]).strip()
    image = viz.pixels_to_image(model, inputs.pixel_values[0])
    steps.update()

    lens = analysis.logit_lens(model, inputs, k=5, cache=cache)
    _, probs = lens.on_grid(0)
    viz.save_html(viz.logit_lens_page(image, lens.str_tokens(model.tokenizer, 0), probs.numpy(),
                                      layer_names=[f"layer {i}" for i in range(model.cfg.n_layers)],
                                      title="Logit lens on the visual tokens"), out / "logit_lens.html")
    steps.update()

    figures = []
    for layer in range(model.cfg.n_layers):
        values = viz.attention_to_image(model, inputs, 0, layers=[layer], cache=cache)
        fig = viz.image_heatmap(image, values, title=f"layer {layer}: attention from the answer position")
        name = f"attention_layer{layer}.png"
        viz.save_figure(fig, out / name)
        figures.append((name, f"Attention from the last position to the image, layer {layer}"))
    if item is not None:
        fig = viz.image_heatmap(image, torch.as_tensor(item.target_mask).float(), title="ground truth: asked-about object")
        viz.save_figure(fig, out / "ground_truth.png")
        figures.insert(0, ("ground_truth.png", "Patches of the object the question is about"))
    steps.update()

    views = {"attention_lm.html": viz.attention_heads(model, inputs, model.cfg.n_layers - 1, cache=cache, collapse_image=True),
             "attention_vision.html": viz.attention_heads(model, inputs, 0, tower="vision")}
    for name, view in views.items():
        viz.save_html(view, out / name)  # circuitsvis's offline build: the report works without a network
    steps.update()

    scores = _ground_truth_scores(model, cfg.n_eval) if cfg.model is None else None
    steps.update()
    steps.close()
    summary = {"prompt": model.tokenizer.decode(inputs.tokens[0][~inputs.image_mask[0]]), "answer": answer,
               "expected": getattr(item, "answer", None), "ground_truth": scores}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    index = out / "index.html"
    index.write_text(_index_html(summary, figures, list(views)))
    return index


def _index_html(summary: dict, figures: list[tuple[str, str]], views: list[str]) -> str:
    rows = ""
    if summary["ground_truth"]:
        gt = summary["ground_truth"]
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in gt["accuracy"].items())
        rows = (f"<h2>Ground truth checks ({gt['n_items']} held-out items)</h2>"
                f"<table id='scores'><tr><th>run</th><th>accuracy</th></tr>{rows}</table>")
    figs = "".join(f"<figure><img src='{n}' alt='{html.escape(c)}'><figcaption>{html.escape(c)}</figcaption></figure>"
                   for n, c in figures)
    links = "".join(f"<li><a href='{v}'>{v}</a></li>" for v in ["logit_lens.html", *views, "results.json"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>vlm-lens demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} figure{{display:inline-block;margin:.5em}}
img{{width:240px;image-rendering:pixelated}} td,th{{padding:.2em 1em;border-bottom:1px solid #ddd}}</style></head>
<body><h1>vlm-lens demo</h1>
<p>Prompt: <code>{html.escape(summary['prompt'])}</code><br>Model answer: <b id="answer">{html.escape(summary['answer'])}</b>
{'' if summary['expected'] is None else f"(expected <b>{html.escape(summary['expected'])}</b>)"}</p>
<h2>Views</h2><ul>{links}</ul>{rows}<h2>Figures</h2>{figs}</body></html>"""
