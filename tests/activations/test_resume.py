"""Killed at any point (SIGKILL), a second call with the same arguments ends with the same bytes as an
uninterrupted run; what a killed run left half-done is never read as complete.

The killed runs are forked child processes of the test (the model is loaded once); the resumed call
runs in the test process.
"""

import json
import os
import signal
from pathlib import Path

import pytest

from vlm_lens import activations
from vlm_lens.activations import files, manifest, shards

from .common import extract_args, no_hooks_left


def assert_same_folder(done: Path, reference: Path) -> None:
    """Byte for byte: the arguments, every shard and progress file, the item list and the manifest
    (not ``joined/``, which readers write on first use)."""
    def written(folder):
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and "joined" not in p.parts)

    names = written(reference)
    assert names == written(done)
    assert any(n.suffix == ".safetensors" for n in names)
    for name in names:
        assert (done / name).read_bytes() == (reference / name).read_bytes(), name


def listed(out: Path) -> list[str]:
    return [s["file"] for s in json.loads((out / "shards" / "rank00000" / "progress.json").read_text())["shards"]]


def run_until_killed(model, out: Path, kill=None, kill_at_item=None) -> None:
    """Run the extraction in a child process (forked: the model is already loaded) that dies by SIGKILL."""
    pid = os.fork()
    if pid == 0:
        try:
            if kill is not None:
                kill(pytest.MonkeyPatch())
            activations.extract(model, **extract_args(out, kill_at=kill_at_item))
        finally:
            os._exit(3)  # not reached when the kill fired
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_killed_mid_shard_resumes_to_the_same_bytes(model, reference, tmp_path):
    out = tmp_path / "acts"
    # items 0-5 make shard 0; the child dies asking for item 9, with items 6-7 run but not yet written
    run_until_killed(model, out, kill_at_item=9)
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


def _before_the_manifest(monkeypatch):
    """Die after every shard is complete and the item list is written, before the manifest."""
    _die_on_call(monkeypatch, manifest, "write_json", 2)  # the first call wrote arguments.json


@pytest.mark.parametrize("kill", [_half_written_shard, _renamed_not_listed, _before_the_manifest])
def test_killed_mid_write_resumes_to_the_same_bytes(model, reference, tmp_path, kill):
    out = tmp_path / "acts"
    run_until_killed(model, out, kill=kill)
    left = sorted(p.name for p in (out / "shards" / "rank00000").iterdir())
    if kill is _half_written_shard:
        assert any(n.startswith("shard-00001.safetensors.") and n.endswith(".tmp") for n in left)
        assert listed(out) == ["shard-00000.safetensors"]
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
