"""The key/value probing tutorial runs end to end on the shipped organism (minutes of CPU: slow)."""

from pathlib import Path

import pytest

from vlm_lens import organism

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_kv_probing_tutorial_executes():
    if not (organism.path() / "config.json").exists():
        pytest.skip(f"no organism weights in {organism.path()}; train them first")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "tutorials" / "kv_probing.ipynb", as_version=4)
    # the kernel starts in the repository root, so vlm_lens imports without an install
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    for marker in ("shuffled labels", "object mIoU per layer", "PCK@0", "InputAgnosticKeys", "without prefix",
                   "GapResult"):
        assert marker in outputs, marker
