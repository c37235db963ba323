"""Tutorial notebooks run end to end (so they cannot rot)."""

from pathlib import Path

import pytest

from vlm_lens import organism

ROOT = Path(__file__).parent.parent
TUTORIALS = ROOT / "tutorials"
UNTRAINED = Path("/tmp/scenes_untrained")  # the notebook's temporary fallback; goes when it does

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


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MARKERS))
def test_tutorial_executes(name):
    if not ((organism.path("scenes") / "model.safetensors").exists() or UNTRAINED.exists()):
        pytest.skip(f"no scenes organism weights in {organism.path('scenes')}; train them first")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    # the kernel starts in the repository root, so vlm_lens imports without an install
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    for marker in MARKERS[name]:
        assert marker in text, marker
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert figures >= 7, f"{figures} figures in the outputs"
