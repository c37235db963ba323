"""The peers table of benchmarks/run.py --peers: one column per library, cells from the figures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from peers import compare  # noqa: E402
from peers.report import edit_cell, peer_table  # noqa: E402


def entry(
    ratio: float, same: bool, output: tuple[float, float], pattern: tuple[float, float], **versions
) -> dict:
    metrics = ("forward", "cache_resid", "noop_hook", "cache_all", "generate")
    return {
        "ratios": dict.fromkeys(metrics, ratio),
        "cache_entries": 71,
        "max_abs_logit_diff_vs_hf": 1.2e-7,
        "same_tokens_as_hf": same,
        "versions": versions,
        "edits": {
            "output": dict(zip(("replace", "in place"), output)),
            "pattern": dict(zip(("replace", "in place"), pattern)),
        },
    }


def peers(hf_tokens: list[int]) -> dict:
    return {
        "dtype": "float32",
        "projector_layer": 10,
        "hf_tokens": [hf_tokens],
        "libraries": {
            "vlm_lens": entry(0.95, True, (0.7, 0.7), (0.02, 0.02), **{"vlm-lens": "0.1.0"}),
            "nnsight": entry(1.5, True, (0.7, 0.7), (0.02, 0.02), nnsight="0.8.1"),
            "tl-bridge": entry(1.25, False, (0.0, 0.7), (0.0, 0.0), **{"transformer-lens": "4.3.0"}),
        },
    }


def rows(lines: list[str]) -> dict[str, list[str]]:
    table = [line.strip("|").split(" | ") for line in lines if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in table}


def test_one_column_per_library_with_each_figure():
    lines = peer_table(peers([5, 9, 5, 7]))
    table = rows(lines)
    assert table[""] == ["vlm_lens", "nnsight", "tl-bridge"]
    assert table["forward, no hooks / HF floor"] == ["0.95x", "1.50x", "1.25x"]
    assert table["greedy generation tokens/s / HF's best"] == ["0.95x", "1.50x", "1.25x (not HF's tokens)"]
    assert table["greedy generation with the KV cache gives HF's tokens"] == ["yes", "yes", "no"]
    output = next(k for k in table if k.startswith("zeroing vision layer 10's output"))
    pattern = next(k for k in table if k.startswith("a uniform attention pattern in vision layer 10"))
    assert table[output] == ["yes", "yes", "only in place"]
    assert table[pattern] == ["yes", "yes", "no"]
    assert table["max abs logit diff vs HF"] == ["1.2e-07"] * 3
    assert table["versions"] == ["vlm-lens 0.1.0", "nnsight 0.8.1", "transformer-lens 4.3.0"]
    assert "4 new, 3 distinct." in "\n".join(lines) and "weak" not in "\n".join(lines)


def test_a_failed_peer_and_a_repeated_token_are_said():
    figures = peers([7, 7, 7])
    figures["libraries"]["tl-bridge"] = {
        "error": "exit 1: Traceback\n  ...\nImportError: no transformer_lens"
    }
    lines = peer_table(figures)
    assert rows(lines)["forward, no hooks / HF floor"][2] == "failed"
    text = "\n".join(lines)
    assert "tl-bridge failed: `exit 1: Traceback ... ImportError: no transformer_lens`" in text
    assert "one repeated token: the generation check is weak" in text


@pytest.mark.parametrize(
    ("diffs", "dtype", "cell"),
    [
        ({"replace": 0.5, "in place": 0.5}, "float32", "yes"),
        ({"replace": 0.0, "in place": 0.5}, "float32", "only in place"),
        ({"replace": 0.5, "in place": 0.0}, "float32", "only replace"),
        ({"replace": 5e-5, "in place": 0.0}, "float32", "no"),
        ({"replace": 0.01, "in place": 0.01}, "bfloat16", "no"),  # bf16 rounding, not an edit
    ],
)
def test_edit_cell(diffs, dtype, cell):
    assert edit_cell(diffs, dtype) == cell


def test_peers_option_names_the_known_peers():
    assert compare.parse("nnsight, tl-bridge") == ["nnsight", "tl-bridge"]
    with pytest.raises(ValueError, match="known peers are nnsight, tl-bridge"):
        compare.parse("nnsight,pyvene")
