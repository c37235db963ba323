"""The benchmark harness runs end to end on a tiny model (numbers are not checked, only the output)."""

import importlib.util
import json
import os
import subprocess
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
        assert {
            "hf_eager",
            "hf_sdpa",
            "vlm_forward",
            "vlm_cache_all",
            "vlm_cache_resid_post",
            "vlm_noop_hook_per_layer",
        } <= set(cases)
        assert all(c["median_s"] > 0 for c in cases.values())
        assert results["forward"][batch]["max_abs_logit_diff_vs_hf"] < 1e-4
        assert (
            results["cache_bytes"][batch]["all"]["tensor_bytes"]
            > results["cache_bytes"][batch]["resid_post"]["tensor_bytes"]
        )
    assert results["generate"]["same_tokens_as_hf"] is True
    assert results["machine"]["cpu"] and results["machine"]["torch"]
    assert "## Targets" in report and "forward, no hooks" in report
    assert ("import" in results) == with_probes and ("### Loading" in report) == with_probes
    return results


def test_quick_mode_on_tiny_model(tmp_path):
    _run_module().main(
        ["--config", "tiny", "--quick", "--rounds", "1", "--skip-probes", "--out", str(tmp_path)]
    )
    _check(tmp_path, with_probes=False)


@pytest.mark.slow  # fresh-process probes re-import torch + transformer_lens: ~10 s of CPU each
def test_quick_mode_with_probes(tmp_path):
    _run_module().main(["--config", "tiny", "--quick", "--out", str(tmp_path)])
    results = _check(tmp_path, with_probes=True)
    assert results["import"]["wall_s"] > 0 and results["load"]["vlm"]["load_s"] > 0


def _check_peer(results: dict, name: str) -> dict:
    entry = results["peers"]["libraries"][name]
    assert "error" not in entry, entry.get("error")
    assert set(entry["ratios"]) == {"forward", "cache_resid", "noop_hook", "cache_all", "generate"}
    assert all(ratio > 0 for ratio in entry["ratios"].values())
    assert entry["max_abs_logit_diff_vs_hf"] < 1e-4 and entry["cache_entries"] > 0
    assert set(entry["edits"]) == {"output", "pattern"}
    return entry


def test_peers_nnsight_on_tiny_model(tmp_path):
    if importlib.util.find_spec("nnsight") is None:
        pytest.skip("nnsight is not installed (pip install -e '.[peers]')")
    # in a child process: importing nnsight patches torch.Tensor and every object (.save) for good
    subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "run.py"),
            "--config",
            "tiny",
            "--quick",
            "--rounds",
            "1",
            "--skip-probes",
            "--out",
            str(tmp_path),
            "--peers",
            "nnsight",
        ],
        check=True,
        timeout=600,
    )
    results = _check(tmp_path, with_probes=False)
    hf_tokens = results["peers"]["hf_tokens"][0]
    assert len(set(hf_tokens)) > 1  # the generation check compares more than one repeated token
    nnsight = _check_peer(results, "nnsight")
    assert nnsight["same_tokens_as_hf"] is True
    assert all(diff > 1e-4 for edits in nnsight["edits"].values() for diff in edits.values())
    assert all(
        diff > 1e-4
        for edits in results["peers"]["libraries"]["vlm_lens"]["edits"].values()
        for diff in edits.values()
    )  # vlm_lens's own vision hooks reach the logits, both ways
    report = (tmp_path / "tiny.md").read_text()
    assert "### Peers" in report and "| | vlm_lens | nnsight |" in report


@pytest.mark.skipif(
    not os.environ.get("VLM_LENS_TL_BRIDGE_PYTHON"),
    reason="set VLM_LENS_TL_BRIDGE_PYTHON to the Python of a transformer-lens>=4 environment",
)
def test_peers_tl_bridge_on_tiny_model(tmp_path):
    _run_module().main(
        [
            "--config",
            "tiny",
            "--quick",
            "--rounds",
            "1",
            "--skip-probes",
            "--out",
            str(tmp_path),
            "--peers",
            "tl-bridge",
            "--tl-bridge-python",
            os.environ["VLM_LENS_TL_BRIDGE_PYTHON"],
        ]
    )
    bridge = _check_peer(_check(tmp_path, with_probes=False), "tl-bridge")
    assert bridge["versions"]["transformer-lens"].startswith("4.")
    assert isinstance(bridge["same_tokens_as_hf"], bool)
