"""The cost of hooks: HookedVLM against plain Hugging Face LLaVA, same model, inputs and process.

    python benchmarks/run.py                      # the CPU model of the issue (about 30 min on 2 cores)
    python benchmarks/run.py --quick              # smaller model, fewer rounds (a few minutes)
    python benchmarks/run.py --config llava-7b    # LLaVA-1.5-7B shapes, bf16, needs a CUDA GPU
    python benchmarks/run.py --peers nnsight,tl-bridge --tl-bridge-python /work/venvs/tl4/bin/python

Writes ``results/<config>.json`` and ``results/<config>.md`` (or under ``--out``). See README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hf_cases  # noqa: E402
from models import SHAPES, Shape, build_folder, make_inputs  # noqa: E402
from peers import compare as peers_compare  # noqa: E402
from probes import probe  # noqa: E402
from report import cache_memory_setting, machine_info, write_report  # noqa: E402
from timing import interleaved, tensor_bytes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        choices=sorted(SHAPES),
        default=None,
        help="model shapes (default: cpu, or quick with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and probes (smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per case at batch 1")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: the config's)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generate call")
    p.add_argument(
        "--skip-probes",
        action="store_true",
        help="skip the fresh-process import/load probes (about 10 s of CPU each)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cache-memory-reuse",
        action="store_true",
        help="vlm_lens.reuse_cache_memory(True) for the whole run (default: off, as in the library)",
    )
    p.add_argument("--folder", type=Path, default=None, help="reuse/build the model folder here")
    p.add_argument("--out", type=Path, default=RESULTS, help="where to write <config>.json/.md")
    p.add_argument(
        "--peers",
        type=peers_compare.parse,
        default=[],
        help="also measure these libraries at batch 1, comma-separated: nnsight, tl-bridge",
    )
    p.add_argument(
        "--tl-bridge-python",
        default=None,
        help="Python of an environment with transformer-lens>=4, for --peers tl-bridge (README.md)",
    )
    args = p.parse_args(argv)
    if "tl-bridge" in args.peers and not args.tl_bridge_python:
        p.error(
            "--peers tl-bridge needs --tl-bridge-python /path/to/venv/bin/python (see benchmarks/README.md)"
        )
    if "nnsight" in args.peers and importlib.util.find_spec("nnsight") is None:
        p.error("--peers nnsight needs nnsight: pip install -e '.[peers]'")
    if args.peers and 1 not in (args.batches or [1]):
        p.error("--peers measures batch 1: include 1 in --batches")
    return args


def load_models(folder: Path, shape: Shape, device: str):
    from vlm_lens import HookedVLM

    hf = hf_cases.load_hf(folder, shape.dtype, device)
    return hf, HookedVLM.from_pretrained_no_processing(str(folder), dtype=shape.dtype, device=device)


def forward_cases(hf: dict, vlm, tokens: torch.Tensor, pixels: torch.Tensor) -> dict:
    from vlm_lens._tl.fast import install_fast_components, uninstall_fast_components

    n_layers = vlm.cfg.n_layers
    noop_hooks = [(f"blocks.{layer}.hook_resid_post", lambda value, hook: None) for layer in range(n_layers)]

    def plain_transformer_lens():  # the same model with TransformerLens's own components
        uninstall_fast_components(vlm)
        try:
            return vlm(tokens, pixel_values=pixels)
        finally:
            install_fast_components(vlm)

    return {
        **hf_cases.forward_cases(hf, tokens, pixels),
        "vlm_forward": lambda: vlm(tokens, pixel_values=pixels),
        "vlm_forward_tl_components": plain_transformer_lens,
        "vlm_cache_all": lambda: vlm.run_with_cache(tokens, pixel_values=pixels),
        "vlm_cache_resid_post": lambda: vlm.run_with_cache(
            tokens, pixel_values=pixels, names_filter=lambda name: name.endswith("hook_resid_post")
        ),
        "vlm_noop_hook_per_layer": lambda: vlm.run_with_hooks(
            tokens, pixel_values=pixels, fwd_hooks=noop_hooks
        ),
    }


def generate_cases(hf: dict, vlm, tokens: torch.Tensor, pixels: torch.Tensor, n_new: int) -> dict:
    return {
        **hf_cases.generate_cases(hf, tokens, pixels, n_new),
        "vlm_generate": lambda: vlm.generate(
            tokens, pixel_values=pixels, max_new_tokens=n_new, stop_at_eos=False, return_type="new_tokens"
        ),
    }


def cache_all_with_memory_reuse(
    hf: dict, vlm, tokens: torch.Tensor, pixels: torch.Tensor, rounds: int, device: str
) -> dict:
    """The full cache again with ``reuse_cache_memory(True)`` (interleaved with HF's forward, which then
    runs under the same allocator setting), then switched back off."""
    from vlm_lens import reuse_cache_memory

    reuse_cache_memory(True)
    try:
        cases = {
            "hf_sdpa_during_memory_reuse": lambda: hf["sdpa"](input_ids=tokens, pixel_values=pixels).logits,
            "vlm_cache_all_memory_reuse": lambda: vlm.run_with_cache(tokens, pixel_values=pixels),
        }
        return interleaved(cases, rounds, device=device)
    finally:
        reuse_cache_memory(False)


def cache_sizes(vlm, tokens: torch.Tensor, pixels: torch.Tensor) -> dict:
    out = {}
    filters = {"all": None, "resid_post": lambda name: name.endswith("hook_resid_post")}
    with torch.no_grad():
        for label, names_filter in filters.items():
            _, cache = vlm.run_with_cache(tokens, pixel_values=pixels, names_filter=names_filter)
            total, held = tensor_bytes(cache.values())
            out[label] = {"n_tensors": len(cache), "tensor_bytes": total, "storage_bytes": held}
            del cache
    return out


def run_probes(results: dict, folder: Path, shape: Shape, device: str, repeats: int, threads: int | None):
    print(f"[{shape.name}] probes: import and load in fresh processes", flush=True)
    for kind in ("import", "import_hooked", "import_hf"):
        results[kind] = probe(kind, repeats=repeats, threads=threads)
    results["import_steps"] = probe("import_steps", threads=threads)
    probe_args = (str(folder), str(shape.dtype).removeprefix("torch."), device)
    results["load"] = {
        kind: probe(kind, *probe_args, repeats=repeats, threads=threads) for kind in ("vlm", "vlm_raw", "hf")
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shape = SHAPES[args.config or ("quick" if args.quick else "cpu")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cache_memory_reuse:
        from vlm_lens import reuse_cache_memory

        reuse_cache_memory(True)
    device = shape.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--config {shape.name} needs a CUDA GPU (it runs {shape.dtype} on cuda).")
    rounds = args.rounds or (2 if args.quick else 11)
    batches = tuple(args.batches or shape.batches)
    n_new = args.new_tokens or (4 if args.quick else 32)
    info = machine_info(device)
    results: dict = {
        "config": shape.name,
        "shape": {k: str(v) for k, v in vars(shape).items()},
        "seq_len": shape.seq_len,
        "n_image_tokens": shape.n_image_tokens,
        "rounds": rounds,
        "machine": info,
        "forward": {},
        "generate": {},
        "cache_bytes": {},
    }

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / "model"
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            build_folder(shape, folder)
        weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        results["weight_bytes"] = weight_bytes
        if not args.skip_probes:
            run_probes(results, folder, shape, device, repeats=1 if args.quick else 3, threads=args.threads)

        hf, vlm = load_models(folder, shape, device)
        for batch in batches:
            tokens, pixels = (t.to(device) for t in make_inputs(shape, batch))
            n_rounds = rounds if batch == 1 else max(1, rounds // 2)
            print(f"[{shape.name}] forward, batch {batch}: {n_rounds} interleaved rounds", flush=True)
            with torch.no_grad():
                ref = hf["sdpa"](input_ids=tokens, pixel_values=pixels).logits
                diff = (vlm(tokens, pixel_values=pixels).float() - ref.float()).abs().max().item()
                timing = interleaved(forward_cases(hf, vlm, tokens, pixels), n_rounds, device=device)
                if not args.cache_memory_reuse:
                    timing.update(cache_all_with_memory_reuse(hf, vlm, tokens, pixels, n_rounds, device))
            results["forward"][batch] = {"max_abs_logit_diff_vs_hf": diff, "cases": timing}
            results["cache_bytes"][batch] = cache_sizes(vlm, tokens, pixels)
        tokens, pixels = (t.to(device) for t in make_inputs(shape, 1))
        print(f"[{shape.name}] generate {n_new} tokens, batch 1", flush=True)
        cases = generate_cases(hf, vlm, tokens, pixels, n_new)
        hf_tokens = cases["hf_generate_sdpa"]().cpu()
        same = torch.equal(hf_tokens, cases["vlm_generate"]().cpu())
        timing = interleaved(cases, max(1, rounds // 2), device=device)
        for case in timing.values():
            case["tokens_per_s"] = n_new / case["median_s"]
        results["generate"] = {
            "new_tokens": n_new,
            "batch": 1,
            "same_tokens_as_hf": same,
            "cases": timing,
            "hf_tokens": hf_tokens.tolist(),
        }
        if args.peers:
            results["peers"] = peers_compare.run(
                args.peers,
                results=results,
                folder=folder,
                hf=hf,
                vlm=vlm,
                tokens=tokens,
                pixels=pixels,
                n_new=n_new,
                rounds=rounds,
                device=device,
                dtype=shape.dtype,
                tl_bridge_python=args.tl_bridge_python,
            )
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["machine"]["cache_memory"] = cache_memory_setting()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{shape.name}.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = write_report(results, args.out / f"{shape.name}.md")
    print(markdown)
    return results


if __name__ == "__main__":
    main()
