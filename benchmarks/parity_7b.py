"""LLaVA-1.5-7B shapes with random weights: HookedVLM against Hugging Face in one precision, on one device.

    python benchmarks/parity_7b.py --lm-layers 4                       # CPU, bf16, 4 of the 32 LM layers
    python benchmarks/parity_7b.py --lm-layers 2 --dtype float32      # the float32 check (max |logit diff|)
    python benchmarks/parity_7b.py --device cuda --lm-layers 32       # the real size on a GPU
    python benchmarks/parity_7b.py --config tiny --device cpu          # seconds (the smoke test)

Builds the random-weight folder (``benchmarks/models.py``, written in the target dtype), loads it with
``LlavaForConditionalGeneration.from_pretrained`` and ``HookedVLM.from_pretrained_no_processing`` (both
memory-map the same file on CPU, so the weights are resident about once), runs one image prompt through
both, and reports: top-1 token agreement at every position, log-prob differences, load time and peak
memory of each loader, forward time of each, and (CPU, bf16) the matmul layouts of the issue. Then, with
the raw model freed, it loads the processed model (``HookedVLM.from_pretrained``: its load time against
HF's, the issue's 3x target, and its log-probs against HF's). Writes
``results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SHAPES, build_folder, make_inputs  # noqa: E402
from report import write_section  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# bf16 keeps 8 bits of mantissa: one rounding is a relative error of 2^-9 = 0.2 %. Two implementations that
# sum in different orders (fused attention, addmm against F.linear) drift by a few roundings per layer, so
# log-probs of logits of size ~1-10 differ by ~1e-2 - 1e-1 after a few layers. What must hold is that the
# model's choice is the same wherever HF's choice is not a near-tie.
BF16_LOGPROB_TOL = 0.25
FP32_TOL = 1e-4


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(fn, device: str, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def matmul_layouts(dtype: torch.dtype, m: int = 600, k: int = 4096, n: int = 11008, repeats: int = 3) -> dict:
    """The issue's product in three layouts: TransformerLens's [d_in, d_out] storage, HF's F.linear, and
    HF's storage read through a transposed view (what vlm_lens now stores)."""
    x = torch.randn(m, k, dtype=dtype)
    w_hf = torch.randn(n, k, dtype=dtype)
    w_tl = w_hf.t().contiguous()
    cases = {"mm(x, W[d_in,d_out] contiguous)": lambda: torch.mm(x, w_tl),
             "F.linear(x, W_hf)": lambda: torch.nn.functional.linear(x, w_hf),
             "mm(x, W_hf.t()) (vlm_lens now)": lambda: torch.mm(x, w_hf.t())}
    return {name: _timed(fn, "cpu", repeats)[0] for name, fn in cases.items()}


def compare(hf_logits: torch.Tensor, vlm_logits: torch.Tensor, tolerance: float) -> dict:
    """Top-1 agreement and log-prob differences. ``tolerance``: the log-prob difference the dtype allows; a
    position is "clear" when HF's top-2 margin exceeds twice it, so that within tolerance the top-1 cannot
    change there (a fixed threshold: the check fails when the differences exceed it)."""
    hf_lp, vlm_lp = hf_logits.float().log_softmax(-1), vlm_logits.float().log_softmax(-1)
    top2 = hf_lp.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    diff = (hf_lp - vlm_lp).abs()
    same = hf_lp.argmax(-1) == vlm_lp.argmax(-1)
    clear = margin > 2 * tolerance
    return {"positions": int(same.numel()), "top1_equal": int(same.sum()), "tolerance": tolerance,
            "within_tolerance": bool(diff.max() <= tolerance),
            "top1_equal_where_clear": bool(same[clear].all()), "clear_positions": int(clear.sum()),
            "max_abs_logit_diff": float((hf_logits.float() - vlm_logits.float()).abs().max()),
            "max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean()),
            "top1_logprob_diff_max": float((hf_lp.max(-1).values - vlm_lp.gather(
                -1, hf_lp.argmax(-1, keepdim=True))[..., 0]).abs().max())}


def run(config: str = "llava-7b", lm_layers: int | None = None, dtype: str = "bfloat16", device: str = "cpu",
        repeats: int = 3, folder: Path | None = None, matmul: bool = True, processed: bool = True) -> dict:
    from transformers import LlavaForConditionalGeneration

    from vlm_lens import HookedVLM

    torch_dtype = getattr(torch, dtype)
    tolerance = FP32_TOL if torch_dtype == torch.float32 else BF16_LOGPROB_TOL
    base = SHAPES[config]
    shape = dataclasses.replace(base, lm_layers=lm_layers or base.lm_layers, dtype=torch_dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = folder or Path(tmp)
        if not (path / "config.json").exists():
            build_folder(shape, path)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        loads, processed_out = {}, None
        rss0 = _rss()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, device_map={"": device},
                                                           attn_implementation="sdpa").eval()
        _sync(device)
        loads["hf"] = {"seconds": time.perf_counter() - t, "rss_increase": _rss() - rss0}
        rss1 = _rss()
        t = time.perf_counter()
        vlm = HookedVLM.from_pretrained_no_processing(str(path), device=device, dtype=torch_dtype)
        _sync(device)
        loads["vlm_raw"] = {"seconds": time.perf_counter() - t, "rss_increase": _rss() - rss1}
        if device.startswith("cuda"):
            loads["cuda_max_memory_allocated"] = torch.cuda.max_memory_allocated()
        tokens, pixels = make_inputs(shape, 1)
        tokens, pixels = tokens.to(device), pixels.to(device=device, dtype=torch_dtype)
        with torch.no_grad():
            hf_s, hf_out = _timed(lambda: hf(input_ids=tokens, pixel_values=pixels).logits, device, repeats)
            vlm_s, vlm_out = _timed(lambda: vlm(tokens, pixel_values=pixels), device, repeats)
        result = {"name": f"parity_{config}_{shape.lm_layers}l_{dtype}_{device.split(':')[0]}",
                  "shape": {k: str(v) for k, v in vars(shape).items()}, "weight_bytes": weight_bytes,
                  "loads": loads, "forward_s": {"hf_sdpa": hf_s, "vlm": vlm_s},
                  "parity": compare(hf_out, vlm_out, tolerance), "seq_len": int(tokens.shape[1]),
                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        vlm = vlm_out = None
        gc.collect()
        if processed:
            # The processed load (folded norms, centred unembedding) after the raw model is freed: its time
            # against HF's load, and its log-probs against HF's (centring moves logits, not log-probs).
            rss2 = _rss()
            t = time.perf_counter()
            vlm = HookedVLM.from_pretrained(str(path), device=device, dtype=torch_dtype)
            _sync(device)
            loads["vlm"] = {"seconds": time.perf_counter() - t, "rss_increase": _rss() - rss2}
            with torch.no_grad():
                processed_out = vlm(tokens, pixel_values=pixels)
            result["parity_processed"] = {k: v for k, v in compare(hf_out, processed_out, tolerance).items()
                                          if k != "max_abs_logit_diff"}
        hf = vlm = hf_out = processed_out = None  # free both models before the matmul timings
        gc.collect()
    if matmul and config == "llava-7b" and device == "cpu" and torch_dtype != torch.float32:
        result["matmul_600x4096x11008"] = matmul_layouts(torch_dtype, repeats=repeats)
    return result


def report(r: dict) -> str:
    p, w = r["parity"], r["weight_bytes"]
    lines = [f"# `{r['name']}`", "",
             f"Random weights, one image prompt of {r['seq_len']} positions; {r['threads']} torch threads, torch "
             f"{r['torch']}; finished {r['finished']}. Weights {w / 2**20:.0f} MiB.", "",
             "| | value |", "|---|---:|",
             f"| top-1 token equal (positions) | {p['top1_equal']} / {p['positions']} |",
             f"| ... equal at every position whose HF top-2 margin exceeds 2x the tolerance | "
             f"{p['top1_equal_where_clear']} ({p['clear_positions']} positions) |",
             f"| max abs logit difference | {p['max_abs_logit_diff']:.3g} |",
             f"| max / mean abs log-prob difference | {p['max_abs_logprob_diff']:.3g} / {p['mean_abs_logprob_diff']:.3g} |",
             f"| ... within the tolerance of {p['tolerance']:g} | {'yes' if p['within_tolerance'] else 'no'} |",
             f"| forward s: HF sdpa / HookedVLM (ratio) | {r['forward_s']['hf_sdpa']:.2f} / {r['forward_s']['vlm']:.2f} "
             f"({r['forward_s']['vlm'] / r['forward_s']['hf_sdpa']:.2f}x) |"]
    q = r.get("parity_processed")
    if q:
        lines += [f"| processed model (`from_pretrained`): top-1 token equal | {q['top1_equal']} / {q['positions']} |",
                  f"| ... equal where HF's top-2 margin exceeds 2x the tolerance | {q['top1_equal_where_clear']} "
                  f"({q['clear_positions']} positions) |",
                  f"| ... max / mean abs log-prob difference | {q['max_abs_logprob_diff']:.3g} / "
                  f"{q['mean_abs_logprob_diff']:.3g} ({'within' if q['within_tolerance'] else 'beyond'} the "
                  f"tolerance) |"]
    hf_s = r["loads"]["hf"]["seconds"]
    for kind, load in r["loads"].items():
        if isinstance(load, dict):
            lines.append(f"| load s (x HF), RSS increase ({kind}) | {load['seconds']:.2f} s ({load['seconds'] / hf_s:.2f}x), "
                         f"{load['rss_increase'] / 2**20:.0f} MiB ({load['rss_increase'] / w:.2f}x weights) |")
        else:
            lines.append(f"| {kind} | {load / 2**30:.2f} GiB |")
    for name, s in r.get("matmul_600x4096x11008", {}).items():
        lines.append(f"| matmul {name} | {s:.3f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llava-7b", choices=sorted(SHAPES))
    p.add_argument("--lm-layers", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--folder", type=Path, default=None, help="reuse/build the model folder here")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None, help="file name of the results (default: from the settings)")
    args = p.parse_args(argv)
    r = run(args.config, args.lm_layers, args.dtype, args.device, args.repeats, args.folder)
    r["name"] = args.name or r["name"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{r['name']}.json").write_text(json.dumps(r, indent=1, default=str))
    text = report(r)
    write_section(args.out / f"{r['name']}.md", None, text)  # keeps the sections other scripts write there
    print(text)
    return r


if __name__ == "__main__":
    main()
