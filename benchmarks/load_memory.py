"""Loading probes alone, on CPU, for shapes too large to time forward passes of here.

    python benchmarks/load_memory.py --config llava-7b --dtype bfloat16                 # all 32 LM layers (~14 GB)
    python benchmarks/load_memory.py --config llava-7b --lm-layers 2 --out /tmp/b       # the same script, small
    python benchmarks/load_memory.py --config cpu --folder /tmp/cpu --repeats 7         # the benchmark model

builds the random-weight folder once (``--folder`` keeps it for the next run; by default a temporary folder,
deleted afterwards) and runs the fresh-process loading probes of ``run.py`` on it, round after round (HookedVLM
processed, raw, HF's own loader, then again), writing ``results/load_<config>_<layers>l_<dtype>.json`` and
``.md`` (medians and minima of the rounds, the load average before and after). ``--section FILE`` also puts
the table into FILE as its "Loading" section, keeping the rest of FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, build_folder  # noqa: E402
from probes import probe  # noqa: E402
from report import MB, machine_info, write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = {"vlm": "HookedVLM.from_pretrained", "vlm_raw": "HookedVLM.from_pretrained_no_processing",
           "hf": "LlavaForConditionalGeneration.from_pretrained"}
# Issue 22's targets: peak RSS over the weight bytes (both loaders), and seconds against HF's own loader.
PEAK_TARGET, TIME_TARGETS = 1.3, {"vlm": 3.0, "vlm_raw": 2.0}
SECTION = "Loading: peak memory and time"


def interleaved(folder: Path, dtype: torch.dtype, repeats: int) -> dict:
    """Each loader once per round, in fresh processes; every sample kept, with medians and minima."""
    args = (str(folder), str(dtype).removeprefix("torch."), "cpu")
    samples: dict[str, list[dict]] = {kind: [] for kind in LOADERS}
    for _ in range(repeats):
        for kind in LOADERS:
            samples[kind].append(probe(kind, *args))
    out = {}
    for kind, runs in samples.items():
        numeric = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[kind] = {**{k: statistics.median(r[k] for r in runs) for k in numeric},
                     "load_s_min": min(r["load_s"] for r in runs), "samples": runs}
    return out


def table(results: dict) -> list[str]:
    loads, weight_bytes = results["load"], results["weight_bytes"]
    hf = loads["hf"]
    lines = ["| loader | seconds, median / min | CPU seconds | / HF: seconds / min / CPU | peak RSS increase MiB | "
             "/ weight bytes | RSS after - before, MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, r in loads.items():
        ratio = "" if kind == "hf" else (f"{r['load_s'] / hf['load_s']:.2f}x / {r['load_s_min'] / hf['load_s_min']:.2f}x"
                                         f" / {r['load_cpu_s'] / hf['load_cpu_s']:.2f}x")
        lines.append(f"| {LOADERS[kind]} | {r['load_s']:.2f} / {r['load_s_min']:.2f} | {r['load_cpu_s']:.2f} | {ratio} | "
                     f"{r['peak_increase'] / MB:.0f} | {r['peak_increase'] / weight_bytes:.2f} | "
                     f"{(r['rss_after_load'] - r['rss_before_load']) / MB:.0f} |")
    touched = hf["peak_increase_touched"]
    lines += ["", f"HF memory-maps the file and reads each weight on first use (its first forward): reading every "
              f"weight once after loading took {hf['read_all_s']:.2f} s more, and its peak is then "
              f"{touched / MB:.0f} MiB ({touched / weight_bytes:.2f}x). Processing must read and rewrite the weights "
              "that read a norm, at load time.", "",
              "| target (medians) | value | met |", "|---|---:|---|"]
    for kind in ("vlm", "vlm_raw"):
        peak = loads[kind]["peak_increase"] / weight_bytes
        lines.append(f"| {LOADERS[kind]}: peak RSS <= {PEAK_TARGET}x weight bytes | {peak:.2f}x | "
                     f"{'yes' if peak <= PEAK_TARGET else 'no'} |")
        ratio = loads[kind]["load_s"] / hf["load_s"]
        lines.append(f"| {LOADERS[kind]}: seconds <= {TIME_TARGETS[kind]}x HF's | {ratio:.2f}x | "
                     f"{'yes' if ratio <= TIME_TARGETS[kind] else 'no'} |")
    return lines


def report(results: dict) -> str:
    m, s = results["machine"], results["shape"]
    return "\n".join([
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
        f"transformer-lens {m['transformer_lens']}; load average {_load(m['loadavg_start'])} before, "
        f"{_load(results['loadavg_end'])} after. Finished {results['finished']}. Weights "
        f"{results['weight_bytes'] / MB:.0f} MiB ({s['lm_layers']} language-model layers of width {s['lm_width']}, "
        f"vision {s['v_layers']} x {s['v_width']}, {s['dtype']}), random, saved once. {results['repeats']} rounds, "
        "each loader once per round in a fresh process; peak = the child's VmHWM after loading minus its RSS "
        "just before (benchmarks/probes.py).", "", *table(results)]) + "\n"


def _load(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llava-7b", choices=sorted(SHAPES))
    p.add_argument("--lm-layers", type=int, default=None, help="language-model layers (default: the config's)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the config's)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each loader once per round)")
    p.add_argument("--folder", type=Path, default=None, help="build the checkpoint here once, and reuse it")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--section", type=Path, default=None, help=f"also write the table as FILE's '{SECTION}' section")
    args = p.parse_args(argv)
    base = SHAPES[args.config]
    dtype = getattr(torch, args.dtype) if args.dtype else base.dtype
    shape = dataclasses.replace(base, lm_layers=args.lm_layers or base.lm_layers, dtype=dtype, device="cpu")
    name = f"load_{base.name}_{shape.lm_layers}l_{str(dtype).removeprefix('torch.')}"
    machine = machine_info("cpu")
    with contextlib.nullcontext(args.folder) if args.folder else tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not (folder / "config.json").exists():
            print(f"[{name}] building the folder {folder}", flush=True)
            folder.mkdir(parents=True, exist_ok=True)
            build_folder(shape, folder)
        weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        loads = interleaved(folder, dtype, args.repeats)
    results = {"config": name, "shape": {k: str(v) for k, v in vars(shape).items()}, "machine": machine,
               "weight_bytes": weight_bytes, "repeats": args.repeats, "load": loads,
               "loadavg_end": os.getloadavg(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    (args.out / f"{name}.md").write_text(f"# Loading probes: `{name}`\n\n{text}")
    if args.section:
        write_section(args.section, SECTION, f"`benchmarks/load_memory.py` ({name}). {text}")
    print(text)
    return results


if __name__ == "__main__":
    main()
