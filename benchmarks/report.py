"""Machine description and the markdown report written next to the JSON results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
from peers.report import peer_table
from probes import IMPORT_LINES

MB = 1024 * 1024
PEAK_TARGET = 1.3  # issue 22: peak resident memory while loading, over the weight bytes (as load_memory.py)
# (label, case, target ratio to the HF floor; None: reported, no target) for the forward-pass targets at batch 1
FORWARD_TARGETS = [
    ("forward, no hooks", "vlm_forward", 1.05),
    ("run_with_cache, names_filter=resid_post", "vlm_cache_resid_post", 1.08),
    ("run_with_hooks, one no-op hook per layer", "vlm_noop_hook_per_layer", 1.08),
    ("run_with_cache, everything (glibc's default trimming, the library default)", "vlm_cache_all", None),
]
# The full cache again with vlm_lens.reuse_cache_memory(True), against HF measured in the same rounds.
REUSE_TARGET = (
    "run_with_cache, everything, reuse_cache_memory(True)",
    "vlm_cache_all_memory_reuse",
    "hf_sdpa_during_memory_reuse",
    1.35,
)


def machine_info(device: str) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "transformer_lens": version("transformer-lens"),
        "python": platform.python_version(),
        "device": device,
        "loadavg_start": os.getloadavg(),
        # glibc allocator settings change what caching costs (see README.md): record them
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cache_memory_setting() -> dict:
    """What vlm_lens did to glibc's trimming (after the run: the threshold follows the largest cache)."""
    from vlm_lens import _memory

    return {"enabled": _memory._enabled(), "trim_threshold": _memory._CacheMemory.trim_threshold}


def _malloc_env(machine: dict) -> str:
    env = machine.get("malloc_env") or {}
    text = ", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) or "glibc defaults"
    kept = (machine.get("cache_memory") or {}).get("trim_threshold")
    if kept:
        text += (
            f"; vlm_lens's first run_with_cache raised glibc's trim threshold to {kept / MB:.0f} MiB "
            "(`reuse_cache_memory`, in force for the HF cases too)"
        )
    elif kept == 0:
        text += "; vlm_lens's cache memory reuse off"
    return text


def _floor(cases: dict) -> tuple[str, float]:
    name = min(("hf_eager", "hf_sdpa"), key=lambda k: cases[k]["median_s"])
    return name, cases[name]["median_s"]


def _forward_table(batch, entry: dict) -> list[str]:
    cases = entry["cases"]
    floor_name, floor = _floor(cases)
    lines = [
        f"### Forward pass, batch {batch} (max |logit diff| vs HF: {entry['max_abs_logit_diff_vs_hf']:.1e})",
        "",
        f"| case | median s | min s | / HF sdpa | / HF eager | / floor ({floor_name}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, c in cases.items():
        if name in REUSE_TARGET[1:3]:  # measured in rounds of their own: against HF sdpa of those rounds only
            own = c["median_s"] / cases[REUSE_TARGET[2]]["median_s"]
            lines.append(f"| {name} | {c['median_s']:.3f} | {c['min_s']:.3f} | {own:.2f} (same rounds) | | |")
            continue
        ratios = [c["median_s"] / cases[k]["median_s"] for k in ("hf_sdpa", "hf_eager")]
        lines.append(
            f"| {name} | {c['median_s']:.3f} | {c['min_s']:.3f} | {ratios[0]:.2f} | "
            f"{ratios[1]:.2f} | {c['median_s'] / floor:.2f} |"
        )
    return lines + [""]


def targets(results: dict) -> list[tuple[str, str, str, bool | None]]:
    """(metric, measured, target, met) rows; met is None where a figure is only reported."""
    rows = []
    forward = results["forward"]
    batch1 = forward.get(1) or forward.get("1")
    if batch1:
        cases = batch1["cases"]
        floor_name, floor = _floor(cases)
        for label, case, target in FORWARD_TARGETS:
            ratio = cases[case]["median_s"] / floor
            best = cases[case]["min_s"] / cases[floor_name]["min_s"]
            rows.append(
                (
                    f"{label} / HF floor, batch 1",
                    f"{ratio:.2f}x (min/min {best:.2f}x)",
                    "reported" if target is None else f"<= {target}x",
                    None if target is None else ratio <= target,
                )
            )
        label, case, reference, target = REUSE_TARGET
        if case in cases:
            ratio = cases[case]["median_s"] / cases[reference]["median_s"]
            best = cases[case]["min_s"] / cases[reference]["min_s"]
            rows.append(
                (
                    f"{label} / HF sdpa in the same rounds, batch 1",
                    f"{ratio:.2f}x (min/min {best:.2f}x)",
                    f"<= {target}x",
                    ratio <= target,
                )
            )
    gen = results["generate"]["cases"]
    hf_best = max(gen["hf_generate_sdpa"]["tokens_per_s"], gen["hf_generate_eager"]["tokens_per_s"])
    ratio = gen["vlm_generate"]["tokens_per_s"] / hf_best
    rows.append(("greedy generate tokens/s / HF's best", f"{ratio:.2f}x", ">= 0.9x", ratio >= 0.9))
    if "import" in results:
        seconds = results["import"]["wall_s"]
        rows.append(("import vlm_lens (fresh process, wall)", f"{seconds:.1f} s", "<= 2 s", seconds <= 2))
        for kind in ("vlm", "vlm_raw"):
            peak = results["load"][kind]["peak_increase"] / results["weight_bytes"]
            rows.append(
                (f"peak RSS while loading ({kind}) / weight bytes", f"{peak:.2f}x", f"<= {PEAK_TARGET}x",
                 peak <= PEAK_TARGET)
            )
    return rows


def _probe_tables(results: dict) -> list[str]:
    lines = ["", "### Import (fresh process)", "", "| line | wall s | CPU s |", "|---|---:|---:|"]
    lines += [
        f"| `{line}` | {results[k]['wall_s']:.2f} | {results[k]['cpu_s']:.2f} |"
        for k, line in IMPORT_LINES.items()
        if k in results
    ]
    lines += [
        "",
        "One process importing step by step (each row: what that step adds):",
        "",
        "| step | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| + `import {k}` | {v['wall_s']:.2f} | {v['cpu_s']:.2f} |"
        for k, v in results["import_steps"].items()
        if isinstance(v, dict)
    ]
    lines += [
        "",
        "### Loading from a local folder (fresh process)",
        "",
        "| loader | seconds | peak RSS increase MiB | / weight bytes | RSS after MiB (anon + file) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "vlm": "HookedVLM.from_pretrained",
        "vlm_raw": "HookedVLM.from_pretrained_no_processing",
        "hf": "LlavaForConditionalGeneration.from_pretrained",
    }
    for kind, r in results["load"].items():
        lines.append(
            f"| {names[kind]} | {r['load_s']:.2f} | {r['peak_increase'] / MB:.0f} | "
            f"{r['peak_increase'] / results['weight_bytes']:.2f} | {r['rss_after_load'] / MB:.0f} "
            f"({r.get('rssanon_after_load', 0) / MB:.0f} + {r.get('rssfile_after_load', 0) / MB:.0f}) |"
        )
    hf = results["load"].get("hf", {})
    if "peak_increase_touched" in hf:
        lines += [
            "",
            "HF memory-maps the checkpoint and reads each weight on first use, so its loading peak "
            "leaves the weights unread; once every weight has been read once (as a first forward does) "
            f"its peak is {hf['peak_increase_touched'] / MB:.0f} MiB "
            f"({hf['peak_increase_touched'] / results['weight_bytes']:.2f}x the weight bytes).",
        ]
    return lines


def write_report(results: dict, path: Path) -> str:
    m = results["machine"]
    lines = [
        f"# vlm_lens benchmark: `{results['config']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}, transformer-lens {m['transformer_lens']}, "
        f"Python {m['python']}, device {m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}. "
        f"Allocator settings: {_malloc_env(m)}. "
        f"Load average at start / end: {m['loadavg_start'][0]:.1f} / {m['loadavg_end'][0]:.1f} "
        f"(above the core count means other jobs shared the CPU: see README.md). "
        f"Finished {results['finished']}. Sequence: {results['seq_len']} tokens "
        f"({results['n_image_tokens']} image tokens); weights {results['weight_bytes'] / MB:.0f} MiB.",
        "",
        "## Targets",
        "",
        "| metric | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    lines += [f"| {a} | {b} | {c} | {'-' if ok is None else 'yes' if ok else 'no'} |" for a, b, c, ok in targets(results)]
    lines.append("")
    for batch, entry in results["forward"].items():
        lines += _forward_table(batch, entry)
    gen = results["generate"]
    lines += [
        f"### Greedy generation, batch {gen['batch']}, {gen['new_tokens']} new tokens "
        f"(same tokens as HF: {gen['same_tokens_as_hf']})",
        "",
        "| case | median s | tokens/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {k} | {c['median_s']:.3f} | {c['tokens_per_s']:.2f} |" for k, c in gen["cases"].items()]
    if "peers" in results:
        lines += [""] + peer_table(results["peers"])
    if "import" in results:
        lines += _probe_tables(results)
    lines += [
        "",
        "### Activation cache size",
        "",
        "| batch | filter | tensors | MiB (sum) | MiB (storages held) |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, sizes in results["cache_bytes"].items():
        lines += [
            f"| {batch} | {k} | {v['n_tensors']} | {v['tensor_bytes'] / MB:.1f} | {v['storage_bytes'] / MB:.1f} |"
            for k, v in sizes.items()
        ]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_section(path: Path, heading: str | None, text: str) -> None:
    """Write one part of a results page that several scripts share, keeping the others: ``heading=None``
    is the head (everything before the first ``## `` line), otherwise the ``## heading`` section."""
    head, sections = "", {}
    if path.exists():
        head, *parts = path.read_text().split("\n## ")
        sections = {part.split("\n", 1)[0]: part for part in parts}
    if heading is None:
        head = text.rstrip("\n") + "\n"
    else:
        sections[heading] = f"{heading}\n\n{text.strip()}\n"
    path.write_text("\n## ".join([head, *sections.values()]))
