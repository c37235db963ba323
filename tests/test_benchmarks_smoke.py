"""The benchmark harness runs end to end on a tiny model (numbers are not checked, only the output)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_module():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(out: Path, with_probes: bool) -> dict:
    results = json.loads((out / "tiny.json").read_text())
    report = (out / "tiny.md").read_text()
    for batch in ("1", "2"):
        cases = results["forward"][batch]["cases"]
        assert {"hf_eager", "hf_sdpa", "vlm_forward", "vlm_cache_all", "vlm_cache_resid_post",
                "vlm_noop_hook_per_layer"} <= set(cases)
        assert all(c["median_s"] > 0 for c in cases.values())
        assert results["forward"][batch]["max_abs_logit_diff_vs_hf"] < 1e-4
        assert results["cache_bytes"][batch]["all"]["tensor_bytes"] > results["cache_bytes"][batch]["resid_post"]["tensor_bytes"]
    assert results["generate"]["same_tokens_as_hf"] is True
    assert results["machine"]["cpu"] and results["machine"]["torch"]
    assert "## Targets" in report and "forward, no hooks" in report
    assert ("import" in results) == with_probes and ("### Loading" in report) == with_probes
    return results


def test_quick_mode_on_tiny_model(tmp_path):
    _run_module().main(["--config", "tiny", "--quick", "--rounds", "1", "--skip-probes", "--out", str(tmp_path)])
    _check(tmp_path, with_probes=False)


@pytest.mark.slow  # fresh-process probes re-import torch + transformer_lens: ~10 s of CPU each
def test_quick_mode_with_probes(tmp_path):
    _run_module().main(["--config", "tiny", "--quick", "--out", str(tmp_path)])
    results = _check(tmp_path, with_probes=True)
    assert results["import"]["wall_s"] > 0 and results["load"]["vlm"]["load_s"] > 0
