"""Where a forward pass spends its time: HookedVLM against Hugging Face, component by component.

    python benchmarks/forward_layers.py --lm-layers 4 --dtype bfloat16                # LLaVA-1.5-7B widths, CPU
    python benchmarks/forward_layers.py --config tiny --dtype float32 --rounds 2 --out /tmp/b   # seconds

Loads one random-weight LLaVA folder (``benchmarks/models.py``; ``--folder`` builds it once and reuses it)
with ``LlavaForConditionalGeneration`` (sdpa attention) and ``HookedVLM.from_pretrained_no_processing``,
runs one image prompt through each, round after round (HF, HookedVLM, HookedVLM with TransformerLens's own
components, HF, ...), and times each component
with forward pre-hooks and hooks on the modules (no hook points are touched, so the fused paths stay on):
the vision tower, the projector, and per language-model layer its two norms, attention and MLP, then the
final norm and the unembedding. Writes ``results/<name>.json`` and ``.md`` (medians of the rounds);
``--section FILE`` also puts the table into FILE as its "Forward per component" section.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, build_folder, make_inputs  # noqa: E402
from report import machine_info, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTION = "Forward per component"


def components(hf, vlm) -> dict[str, tuple]:
    """Label -> (HF module, HookedVLM module), in the order they run."""
    inner, out = hf.model, {}
    out["vision tower"] = (inner.vision_tower, vlm.vision)
    out["projector"] = (inner.multi_modal_projector, vlm.projector)
    for i, (layer, block) in enumerate(zip(inner.language_model.layers, vlm.blocks, strict=True)):
        out[f"layer {i} norm 1"] = (layer.input_layernorm, block.ln1)
        out[f"layer {i} attention"] = (layer.self_attn, block.attn)
        out[f"layer {i} norm 2"] = (layer.post_attention_layernorm, block.ln2)
        out[f"layer {i} MLP"] = (layer.mlp, block.mlp)
    out["final norm"] = (inner.language_model.norm, vlm.ln_final)
    out["unembedding"] = (hf.lm_head, vlm.unembed)
    return out


class Timer:
    """Wall time between each module's forward pre-hook and hook (CUDA synchronised), summed per label."""

    def __init__(self, modules: dict[str, torch.nn.Module], device: str):
        self.device, self.seconds, self._start, self._handles = device, defaultdict(float), {}, []
        for label, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(lambda *_, label=label: self._begin(label)))
            self._handles.append(module.register_forward_hook(lambda *_, label=label: self._end(label)))

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _begin(self, label: str) -> None:
        self._sync()
        self._start[label] = time.perf_counter()

    def _end(self, label: str) -> None:
        self._sync()
        self.seconds[label] += time.perf_counter() - self._start.pop(label)

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


def _with_tl_components(vlm, tokens: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The same model with TransformerLens's own components (``fast=False``)."""
    from vlm_lens._tl.fast import install_fast_components, uninstall_fast_components

    uninstall_fast_components(vlm)
    try:
        return vlm(tokens, pixel_values=pixels)
    finally:
        install_fast_components(vlm)


def run(
    config: str,
    lm_layers: int | None,
    dtype: str,
    device: str,
    rounds: int,
    folder: Path | None,
    tl_components: bool = True,
) -> dict:
    from transformers import LlavaForConditionalGeneration

    from vlm_lens import HookedVLM

    machine = machine_info(device)  # the load average before the rounds
    torch_dtype = getattr(torch, dtype)
    base = SHAPES[config]
    shape = dataclasses.replace(base, lm_layers=lm_layers or base.lm_layers, dtype=torch_dtype, device=device)
    with nullcontext(folder) if folder else tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        if not (path / "config.json").exists():
            build_folder(shape, path)
        hf = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, device_map={"": device}, attn_implementation="sdpa"
        ).eval()
        vlm = HookedVLM.from_pretrained_no_processing(str(path), device=device, dtype=torch_dtype)
        tokens, pixels = make_inputs(shape, 1)
        tokens, pixels = tokens.to(device), pixels.to(device=device, dtype=torch_dtype)
        parts = components(hf, vlm)
        vlm_timer = Timer({k: v[1] for k, v in parts.items()}, device)
        timers = {
            "hf": Timer({k: v[0] for k, v in parts.items()}, device),
            "vlm": vlm_timer,
            "vlm_tl": vlm_timer,
        }
        calls = {
            "hf": lambda: hf(input_ids=tokens, pixel_values=pixels).logits,
            "vlm": lambda: vlm(tokens, pixel_values=pixels),
            "vlm_tl": lambda: _with_tl_components(vlm, tokens, pixels),
        }
        if not tl_components:
            del calls["vlm_tl"]
        samples: dict[str, list[dict]] = {name: [] for name in calls}
        with torch.no_grad():
            for name, call in calls.items():  # warm-up round, not kept
                call()
                timers[name].take()
            for _ in range(rounds):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    samples[name].append({"total": time.perf_counter() - start, **timers[name].take()})
    for runs in samples.values():  # per round: the time outside the timed modules (they do not nest)
        for sample in runs:
            sample["outside"] = sample["total"] - sum(sample[k] for k in parts)
    labels = ["total", *parts, "outside"]
    medians = {
        name: {k: statistics.median(s[k] for s in runs) for k in labels} for name, runs in samples.items()
    }
    return {
        "name": f"forward_{config}_{shape.lm_layers}l_{dtype}_{device.split(':')[0]}",
        "seq_len": int(tokens.shape[1]),
        "shape": {k: str(v) for k, v in vars(shape).items()},
        "machine": machine,
        "rounds": rounds,
        "median_s": medians,
        "samples": samples,
        "loadavg_end": os.getloadavg(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _group(label: str) -> str:
    return label.split(" ", 2)[-1] if label.startswith("layer ") else label


def report(r: dict) -> str:
    med, m = r["median_s"], r["machine"]
    hf, vlm = med["hf"], med["vlm"]
    layers = [k for k in hf if k.startswith("layer ")]
    sums = defaultdict(lambda: [0.0, 0.0])
    for k in layers:
        sums[_group(k)][0] += hf[k]
        sums[_group(k)][1] += vlm[k]
    rest = (hf["outside"], vlm["outside"])  # the median over rounds of each round's total minus its modules
    lines = [
        f"One image prompt of {r['seq_len']} positions, {r['shape']['dtype']}, {r['machine']['device']}; "
        f"{m['cpu']}, {m['torch_threads']} torch threads, torch {m['torch']}; load average "
        f"{'/'.join(f'{x:.1f}' for x in m['loadavg_start'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in r['loadavg_end'])} after; finished {r['finished']}. Medians of "
        f"{r['rounds']} interleaved rounds after a warm-up (`benchmarks/forward_layers.py`).",
        "",
        "| component | HF sdpa s | HookedVLM s | ratio |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, a: float, b: float) -> str:
        return (
            f"| {label} | {a:.3f} | {b:.3f} | {b / a:.2f}x |"
            if a > 0
            else f"| {label} | {a:.3f} | {b:.3f} | |"
        )

    lines += [row("**whole forward**", hf["total"], vlm["total"])]
    if "vlm_tl" in med:
        lines += [
            row(
                "whole forward, TransformerLens's own components (`fast=False`)",
                hf["total"],
                med["vlm_tl"]["total"],
            )
        ]
    lines += [row(k, hf[k], vlm[k]) for k in ("vision tower", "projector")]
    lines += [row(f"LM layers, {g} (sum of {len(layers) // 4})", a, b) for g, (a, b) in sums.items()]
    lines += [row(k, hf[k], vlm[k]) for k in ("final norm", "unembedding")]
    lines += [
        row("outside these modules (embedding, merge, masks)", *rest),
        "",
        "Per layer:",
        "",
        "| layer | part | HF s | HookedVLM s | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {k.split(' ')[1]} | {_group(k)} | {hf[k]:.3f} | {vlm[k]:.3f} | {vlm[k] / hf[k]:.2f}x |"
        for k in layers
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llava-7b", choices=sorted(SHAPES))
    p.add_argument("--lm-layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-tl-components", action="store_true", help="skip the fast=False case")
    p.add_argument("--folder", type=Path, default=None, help="build the checkpoint here once, and reuse it")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--section", type=Path, default=None, help=f"also write the table as FILE's '{SECTION}' section"
    )
    args = p.parse_args(argv)
    r = run(
        args.config,
        args.lm_layers,
        args.dtype,
        args.device,
        args.rounds,
        args.folder,
        not args.no_tl_components,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{r['name']}.json").write_text(json.dumps(r, indent=1, default=str))
    text = report(r)
    (args.out / f"{r['name']}.md").write_text(f"# `{r['name']}`\n\n{text}")
    if args.section:
        write_section(args.section, SECTION, text)
    print(text)
    return r


if __name__ == "__main__":
    main()
