"""Tutorial notebooks are committed executed with every finding written, and run end to end (slow), so they
cannot rot."""

from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
TUTORIALS = ROOT / "tutorials"

# One line each section prints, in order.
MARKERS = {
    "01_visual_processing_on_the_organism.ipynb": (
        "held-out accuracy through HookedVLM",
        "HF parity on one batch",
        "mean-ablation at hook_image_embeds",
        "accuracy drop (points), object vs random",
        "logit lens at resid_post, top-1 token",
        "knockout from the answer positions over windows",
        "share of the patching effect on the recoloured object's patches",
        "model.generate, described object mean-ablated",
        "notebook executed in",
    ),
}


def check_outputs(nb, name) -> None:
    assert not [cell.source[:60] for cell in nb.cells if "TBD" in cell.source]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    for marker in MARKERS[name]:
        assert marker in text, marker
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 7, f"{figures} figures in the outputs"


@pytest.mark.parametrize("name", list(MARKERS))
def test_tutorial_is_committed_executed(name):
    nbformat = pytest.importorskip("nbformat")
    check_outputs(nbformat.read(TUTORIALS / name, as_version=4), name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MARKERS))
def test_tutorial_executes(name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # the kernel starts in the repository root, so vlm_lens imports without an install
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    check_outputs(nb, name)
