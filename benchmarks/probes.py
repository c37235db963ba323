"""Measurements that need a fresh process: import time, load time and peak memory while loading.

The parent calls ``probe(kind, ...)``, which runs this file as a child (``python probes.py KIND ...``)
and reads one JSON line back. Peak memory is the child's resident high-water mark (``VmHWM``, reset to
the current size just before loading where the kernel allows) after loading minus its resident memory
just before loading, so imported libraries are not counted. Not ``ru_maxrss``: Linux carries that over
from the parent through fork and exec, so a parent that had built a large model folder would set every
child's "peak".
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORT_STEPS = ("torch", "transformers", "transformers.modeling_utils", "transformer_lens", "vlm_lens",
                "vlm_lens.hooked_vlm")
# What a user's first line costs: the package alone (public names load on first use), the class they
# use, and Hugging Face's own class as the floor.
IMPORT_LINES = {"import": "import vlm_lens", "import_hooked": "from vlm_lens import HookedVLM",
                "import_hf": "from transformers import LlavaForConditionalGeneration"}


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} (the load probes need Linux)")


def _reset_peak() -> bool:
    """Set the resident high-water mark to the current size (Linux >= 4.0: clear_refs 5). Where that
    is refused, VmHWM also covers the imports, which can only over-state the peak; the result says so."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_bytes() -> int:
    return _status_bytes("VmHWM")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_split() -> dict:
    """Resident memory after loading, split into anonymous (tensors we own) and file-backed (mmapped
    checkpoint pages still mapped) parts."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower() + "_after_load"] = int(line.split()[1]) * 1024
    return out


def _child(kind: str, args: list[str]) -> dict:
    import importlib

    if kind in IMPORT_LINES:  # one import line, as a user's first line
        wall, cpu = time.perf_counter(), _cpu_s()
        exec(IMPORT_LINES[kind], {})  # noqa: S102  (a fixed line from this file)
        return {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu_s() - cpu}
    if kind == "import_steps":  # what the time goes to: each step's increment
        out = {}
        for name in IMPORT_STEPS:
            wall, cpu = time.perf_counter(), _cpu_s()
            importlib.import_module(name)
            out[name] = {"wall_s": time.perf_counter() - wall, "cpu_s": _cpu_s() - cpu}
        return out
    folder, dtype, device = args
    import torch

    dtype = getattr(torch, dtype)
    if kind == "hf":
        from transformers import LlavaForConditionalGeneration

        load = lambda: LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device)  # noqa: E731
    else:
        from vlm_lens import HookedVLM

        method = HookedVLM.from_pretrained if kind == "vlm" else HookedVLM.from_pretrained_no_processing
        load = lambda: method(folder, dtype=dtype, device=device)  # noqa: E731
    gc.collect()
    peak_reset = _reset_peak()
    before, start, cpu_start = _rss_bytes(), time.perf_counter(), _cpu_s()
    model = load()
    seconds, cpu_seconds = time.perf_counter() - start, _cpu_s() - cpu_start
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"load_s": seconds, "load_cpu_s": cpu_seconds, "rss_before_load": before, "peak_rss": _peak_bytes(),
              "peak_increase": _peak_bytes() - before, "rss_after_load": _rss_bytes(),
              "param_bytes": n_bytes, "peak_reset": peak_reset, **_rss_split()}
    if device.startswith("cuda"):
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    if kind == "hf":  # HF maps the file and reads weights on first use: the peak (and time) once all were read
        start = time.perf_counter()
        with torch.no_grad():
            for p in model.parameters():
                p.sum()
        result["peak_increase_touched"] = _peak_bytes() - before
        result["read_all_s"] = time.perf_counter() - start
    return result


def probe(kind: str, *args: str, repeats: int = 1, threads: int | None = None) -> dict:
    """Run the ``kind`` probe ``repeats`` times in fresh processes; medians of numeric fields."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), kind, *args], env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"probe {kind} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {**_median_of(runs), "runs": len(runs)}


def _median_of(runs: list[dict]) -> dict:
    return {key: _median_of([r[key] for r in runs]) if isinstance(value, dict)
            else statistics.median(r[key] for r in runs) for key, value in runs[0].items()}


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2:])))
