"""Loading probes alone, on CPU, for shapes too large to time forward passes of here.

    python benchmarks/load_memory.py --config llava-7b --lm-layers 6 --dtype bfloat16

builds the random-weight folder (LLaVA-1.5-7B widths; ``--lm-layers`` keeps it within this machine's
memory) and runs the fresh-process loading probes of ``run.py`` on it (HookedVLM processed and raw,
HF's own loader), writing ``results/load_<config>_<layers>l_<dtype>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, build_folder  # noqa: E402
from probes import probe  # noqa: E402
from report import MB, machine_info  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOADERS = {"vlm": "HookedVLM.from_pretrained", "vlm_raw": "HookedVLM.from_pretrained_no_processing",
           "hf": "LlavaForConditionalGeneration.from_pretrained"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llava-7b", choices=sorted(SHAPES))
    p.add_argument("--lm-layers", type=int, default=None, help="language-model layers (default: the config's)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the config's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    base = SHAPES[args.config]
    dtype = getattr(torch, args.dtype) if args.dtype else base.dtype
    shape = dataclasses.replace(base, lm_layers=args.lm_layers or base.lm_layers, dtype=dtype, device="cpu")
    name = f"load_{base.name}_{shape.lm_layers}l_{str(dtype).removeprefix('torch.')}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"[{name}] building the folder", flush=True)
        build_folder(shape, folder)
        weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        probe_args = (str(folder), str(dtype).removeprefix("torch."), "cpu")
        loads = {kind: probe(kind, *probe_args, repeats=args.repeats) for kind in LOADERS}
    results = {"config": name, "shape": {k: str(v) for k, v in vars(shape).items()}, "machine": machine_info("cpu"),
               "weight_bytes": weight_bytes, "load": loads, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    m = results["machine"]
    lines = [f"# Loading probes: `{name}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, transformers {m['transformers']}, "
             f"transformer-lens {m['transformer_lens']}. Finished {results['finished']}. Weights "
             f"{weight_bytes / MB:.0f} MiB ({shape.lm_layers} language-model layers of width {shape.lm_width}, "
             f"vision {shape.v_layers} x {shape.v_width}, {dtype}). Medians of {args.repeats} fresh processes.", "",
             "| loader | seconds | peak RSS increase MiB | / weight bytes | RSS after - before, MiB |",
             "|---|---:|---:|---:|---:|"]
    for kind, r in loads.items():
        lines.append(f"| {LOADERS[kind]} | {r['load_s']:.1f} | {r['peak_increase'] / MB:.0f} | "
                     f"{r['peak_increase'] / weight_bytes:.2f} | {(r['rss_after_load'] - r['rss_before_load']) / MB:.0f} |")
    touched = loads["hf"]["peak_increase_touched"]
    lines += ["", f"HF reads each weight on first use; after reading all once its peak is {touched / MB:.0f} MiB "
              f"({touched / weight_bytes:.2f}x)."]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
