"""Tutorial notebooks run end to end (so they cannot rot)."""

from pathlib import Path

import pytest

TUTORIALS = Path(__file__).parent.parent / "tutorials"


@pytest.mark.parametrize("name", ["01_visual_processing_on_the_organism.ipynb"])
def test_tutorial_executes(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "accuracy: baseline" in outputs and "share of the patching effect" in outputs
