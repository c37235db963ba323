"""Killed at any point (SIGKILL), a second call with the same arguments ends with the same bytes as an
uninterrupted run; what a killed run left half-done is never read as complete."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_lens import activations
from vlm_lens.activations import files, manifest, shards

from .common import extract_args, no_hooks_left

SCRIPT = Path(__file__).with_name("run_extract.py")
ROOT = Path(__file__).resolve().parents[2]
OUTPUTS = ("manifest.json", "items.jsonl", "rows.safetensors")


def assert_same_folder(done: Path, reference: Path) -> None:
    names = [*OUTPUTS, *(f"hooks/{h}.safetensors" for h in json.loads((reference / "manifest.json").read_text())["hooks"])]
    for name in names:
        assert (done / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (done / "shards").exists()


def listed(out: Path) -> list[str]:
    return [s["file"] for s in json.loads((out / "shards" / "rank00000" / "progress.json").read_text())["shards"]]


def test_killed_subprocess_resumes_to_the_same_bytes(model, reference, tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # items 0-5 make shard 0; the process dies asking for item 9, with items 6-7 run but not yet written
    run = subprocess.run([sys.executable, str(SCRIPT), str(out), "--kill-at-item", "9"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    assert listed(out) == ["shard-00000.safetensors"] and not (out / "manifest.json").exists()
    with pytest.raises(ValueError, match="unfinished extraction"):
        activations.load(out)
    store = activations.extract(model, **extract_args(out))
    assert_same_folder(out, reference)
    assert store.manifest["n_items"] == 12 and no_hooks_left(model)


def _die_on_call(monkeypatch, module, name, call):
    original, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def _half_written_shard(monkeypatch):
    """Die inside the second shard's data: after its first tensor parts reach the temporary file."""
    _die_on_call(monkeypatch, files, "_as_bytes", 2 * 10 + 3)  # 10 parts per shard: 3 hooks x 3 batches + rows


def _renamed_not_listed(monkeypatch):
    """Die after the second shard is renamed into place, before progress.json lists it."""
    _die_on_call(monkeypatch, shards, "write_json", 2)


def _while_joining(monkeypatch):
    """Die after every shard is complete, while the per-hook files are joined (before the manifest)."""
    _die_on_call(monkeypatch, manifest, "join_safetensors", 2)


@pytest.mark.parametrize("kill", [_half_written_shard, _renamed_not_listed, _while_joining])
def test_killed_mid_write_resumes_to_the_same_bytes(model, reference, tmp_path, monkeypatch, kill):
    out = tmp_path / "acts"
    pid = os.fork()  # a child process with the model already loaded: it dies where `kill` says
    if pid == 0:
        try:
            kill(monkeypatch)
            activations.extract(model, **extract_args(out))
        finally:
            os._exit(3)  # not reached when the kill fired
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    left = sorted(p.name for p in (out / "shards" / "rank00000").iterdir())
    if kill is _half_written_shard:
        assert "shard-00001.safetensors.tmp" in left and listed(out) == ["shard-00000.safetensors"]
    elif kill is _renamed_not_listed:
        assert "shard-00001.safetensors" in left and listed(out) == ["shard-00000.safetensors"]
    else:
        assert len(listed(out)) == 2 and not (out / "manifest.json").exists()
    activations.extract(model, **extract_args(out))
    assert_same_folder(out, reference)


def test_a_finished_folder_is_not_extracted_again(model, reference, monkeypatch):
    before = (reference / "manifest.json").stat().st_mtime_ns
    monkeypatch.setattr(shards.RankShards, "write", lambda *a: pytest.fail("extracted again"))
    store = activations.extract(model, **extract_args(reference))
    assert store.manifest["n_items"] == 12 and (reference / "manifest.json").stat().st_mtime_ns == before
