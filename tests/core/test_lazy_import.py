"""`import vlm_lens` stays light: the heavy libraries load when a public name is first used."""

import subprocess
import sys

import pytest

import vlm_lens


def test_import_vlm_lens_does_not_import_torch_or_transformer_lens():
    code = ("import sys, vlm_lens; heavy = [m for m in ('torch', 'transformers', 'transformer_lens') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_names_resolve_on_first_use():
    from vlm_lens.hooked_vlm import HookedVLM
    from vlm_lens.inputs import VLMInputs
    from vlm_lens.layout import ImageLayout

    assert vlm_lens.HookedVLM is HookedVLM and vlm_lens.VLMInputs is VLMInputs
    assert vlm_lens.ImageLayout is ImageLayout
    assert vlm_lens.analysis.logit_lens is not None  # subpackages too
    assert {"HookedVLM", "analysis", "viz"} <= set(dir(vlm_lens))
    with pytest.raises(AttributeError, match="no attribute 'HookedVLN'"):
        vlm_lens.HookedVLN  # noqa: B018
