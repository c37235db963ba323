"""LLaVA-1.5-7B widths (CLIP ViT-L/14-336, Llama 4096 wide, vocab 32064) with random weights against HF:
bf16 (top-1 equal wherever HF's choice is not a rounding tie, log-probs within the bf16 tolerance) and float32
(logits within 1e-4). One language-model layer each, so they run in minutes on a CPU within ~6 GB;
``benchmarks/parity_7b.py --lm-layers N`` runs more (results in benchmarks/results/)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _parity_module():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("benchmarks_parity_7b", BENCHMARKS / "parity_7b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_7b_shapes_bf16_match_hf(tmp_path):
    parity = _parity_module()
    r = parity.run("llava-7b", lm_layers=1, dtype="bfloat16", device="cpu", repeats=1, folder=tmp_path, matmul=False)
    p = r["parity"]
    assert p["top1_equal_where_clear"], p
    assert p["max_abs_logprob_diff"] <= parity.BF16_LOGPROB_TOL, p
    q = r["parity_processed"]  # folded norms and a centred unembedding: log-probs, not logits, are kept
    assert q["top1_equal_where_clear"], q
    assert q["max_abs_logprob_diff"] <= parity.BF16_LOGPROB_TOL, q


@pytest.mark.slow
def test_7b_shapes_float32_match_hf_within_1e_4(tmp_path):
    parity = _parity_module()
    r = parity.run("llava-7b", lm_layers=1, dtype="float32", device="cpu", repeats=1, folder=tmp_path, matmul=False)
    assert r["parity"]["max_abs_logit_diff"] <= parity.FP32_TOL, r["parity"]
    assert r["parity"]["top1_equal"] == r["parity"]["positions"]
    assert r["parity_processed"]["max_abs_logprob_diff"] <= parity.FP32_TOL, r["parity_processed"]
    assert r["parity_processed"]["top1_equal"] == r["parity_processed"]["positions"]


def test_parity_script_on_tiny_shapes(tmp_path):
    """The GPU check's parity step (``gpu_check.sh --device cpu`` runs the same) in seconds: raw and processed
    models against HF in bf16, and the report carries the processed load's ratio to HF's."""
    parity = _parity_module()
    r = parity.run("tiny", lm_layers=2, dtype="bfloat16", device="cpu", repeats=1, folder=tmp_path)
    for key in ("parity", "parity_processed"):
        assert r[key]["top1_equal_where_clear"], r[key]
        assert r[key]["max_abs_logprob_diff"] <= parity.BF16_LOGPROB_TOL, r[key]
    assert set(r["loads"]) >= {"hf", "vlm_raw", "vlm"}
    text = parity.report(r)
    assert "processed model (`from_pretrained`): top-1 token equal" in text
    assert "(vlm) |" in text and "x), " in text


def test_the_clear_top1_check_can_fail():
    """'Clear' positions are those whose HF margin beats twice the stated tolerance, not the measured difference
    (against which any argmax is trivially stable): unrelated logits fail it."""
    parity = _parity_module()
    hf = torch.randn(2, 50, 40, generator=torch.Generator().manual_seed(0)) * 5
    other = torch.randn(2, 50, 40, generator=torch.Generator().manual_seed(1)) * 5
    bad = parity.compare(hf, other, parity.BF16_LOGPROB_TOL)
    assert bad["clear_positions"] > 0 and not bad["top1_equal_where_clear"] and not bad["within_tolerance"]
    good = parity.compare(hf, hf + 1e-3, parity.BF16_LOGPROB_TOL)
    assert good["top1_equal_where_clear"] and good["within_tolerance"]
