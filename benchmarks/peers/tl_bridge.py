"""Run ``tl_bridge_child.py`` with TransformerLens 4's Python on the same folder and inputs; read its figures."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

CHILD = Path(__file__).resolve().parent / "tl_bridge_child.py"
TIMEOUT_S = 3600


def child_env() -> dict:
    """The parent's environment without its Python path (the child must not see TransformerLens 3.9),
    offline (the folder is local), and with the same thread count."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def run(
    python: str,
    folder: Path,
    tokens: torch.Tensor,
    pixels: torch.Tensor,
    n_new: int,
    rounds: int,
    device: str,
    dtype: torch.dtype,
) -> tuple[dict, torch.Tensor | None, torch.Tensor | None]:
    """(figures, logits, new tokens) from the child; on failure ({"error": ...}, None, None)."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "inputs.pt", Path(tmp) / "result.json"
        torch.save({"tokens": tokens.cpu(), "pixels": pixels.cpu()}, inputs)
        command = [
            python,
            str(CHILD),
            "--folder",
            str(folder),
            "--inputs",
            str(inputs),
            "--out",
            str(out),
            "--rounds",
            str(rounds),
            "--new-tokens",
            str(n_new),
            "--threads",
            str(torch.get_num_threads()),
            "--device",
            device,
            "--dtype",
            str(dtype).removeprefix("torch."),
        ]
        try:
            done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            return {"error": f"{type(error).__name__}: {error}"}, None, None
        if done.returncode != 0 or not out.exists():
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}, None, None
        tensors = torch.load(out.with_suffix(".pt"))
        return json.loads(out.read_text()), tensors["logits"], tensors["new_tokens"]
