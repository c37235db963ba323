"""The SAE tutorial runs end to end (so it cannot rot)."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
NOTEBOOK = ROOT / "tutorials" / "sae_on_the_organism.ipynb"


def test_sae_tutorial_executes(tmp_path, monkeypatch):
    # the kernel runs in tmp_path: put this checkout first on its path, whatever PYTHONPATH says
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "max |logits - clean| with the error term" in outputs and "best colour/shape feature" in outputs
    assert "accuracy: clean" in outputs and "quick SAE at blocks.0.hook_resid_post" in outputs
    assert (tmp_path / "feature_page.html").stat().st_size > 1000
