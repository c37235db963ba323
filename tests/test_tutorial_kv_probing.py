"""The key/value probing tutorial is committed executed, and runs end to end on the scenes organism (a minute or
two of CPU: slow)."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

# What the notebook prints, one marker per section: the readout, the probes per layer (foreground mIoU,
# per-patch colour and shape accuracy, each with its shuffled-label baseline), the text-query
# segmentation, correspondence, input-agnostic keys, prefix control and the probe-vs-output gap.
MARKERS = (
    "v: (8, ",  # values of the 8 LM layers, on the image grid
    "foreground                v: mIoU per layer",
    "colour                v: accuracy per layer",
    "shape                v: accuracy per layer",
    "shuffled labels",
    "the true patch masks score",
    "object mIoU per layer",
    "PCK@0",
    "chance PCK@0",
    "InputAgnosticKeys",
    "without prefix",
    "colour_of_shape: GapResult",
    "shape_of_colour: GapResult",
    "executed in",
)


def check_outputs(nb) -> None:
    """The markers are printed, every figure is in the outputs and every finding is written."""
    assert not [cell.source[:60] for cell in nb.cells if "TBD" in cell.source]
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = "".join(o.get("text", "") for cell in code for o in cell.get("outputs", []))
    for marker in MARKERS:
        assert marker in outputs, marker
    figures = sum("image/png" in o.get("data", {}) for cell in code for o in cell.get("outputs", []))
    assert figures >= 7, f"{figures} figures in the outputs"


@pytest.mark.slow
def test_kv_probing_tutorial_executes():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "tutorials" / "kv_probing.ipynb", as_version=4)
    # the kernel starts in the repository root, so vlm_lens imports without an install
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    check_outputs(nb)


def test_kv_probing_tutorial_is_committed_executed():
    nbformat = pytest.importorskip("nbformat")
    check_outputs(nbformat.read(ROOT / "tutorials" / "kv_probing.ipynb", as_version=4))
