"""The same call under torchrun with two CPU processes (gloo): the union of the ranks equals one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vlm_lens import activations

SCRIPT = Path(__file__).with_name("run_extract.py")
ROOT = Path(__file__).resolve().parents[2]


def test_two_processes_equal_one(reference, tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(SCRIPT), str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    two, one = activations.load(out), activations.load(reference)
    assert {s["rank"] for s in two.manifest["shards"]} == {0, 1}
    assert json.loads((out / "arguments.json").read_text())["world_size"] == 2
    assert two.hooks == one.hooks and two.items == one.items
    assert torch.equal(two.rows.table, one.rows.table)
    for hook in one.hooks:
        assert torch.equal(two.tensor(hook), one.tensor(hook)), hook
