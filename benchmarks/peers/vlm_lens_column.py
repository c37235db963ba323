"""The vlm_lens column of the peers table: its timings are the main run's (batch 1, interleaved with HF in
the same rounds), so nothing is timed twice; only the vision edits run here, through vlm_lens's hooks."""

from __future__ import annotations

import functools

import hf_cases
import torch

from peers.common import edit_diffs, hook_edits, uniform, zeros

# the peers table's metric -> the main run's case
CASES = {
    "forward": "vlm_forward",
    "cache_resid": "vlm_cache_resid_post",
    "noop_hook": "vlm_noop_hook_per_layer",
    "cache_all": "vlm_cache_all",
}


def vision_edits(vlm, tokens: torch.Tensor, pixels: torch.Tensor, layer: int) -> dict:
    """``vision.blocks.{layer}.hook_resid_post`` zeroed and ``vision.blocks.{layer}.attn.hook_pattern``
    made uniform, each by a returned value and in place."""
    from vlm_lens.hook_names import act_name

    run_with_hooks = functools.partial(vlm.run_with_hooks, tokens, pixel_values=pixels)
    return edit_diffs(
        lambda: vlm(tokens, pixel_values=pixels),
        hook_edits(run_with_hooks, act_name("resid_post", layer, tower="vision"), zeros),
        hook_edits(run_with_hooks, act_name("pattern", layer, tower="vision"), uniform),
    )


def column(results: dict, vlm, tokens: torch.Tensor, pixels: torch.Tensor, layer: int) -> dict:
    """vlm_lens's figures in the shape ``peers.common.measure`` gives the other libraries'."""
    from importlib.metadata import version

    cases = results["forward"][1]["cases"]
    generation = results["generate"]["cases"]
    ratios = {metric: cases[case]["median_s"] / hf_cases.floor_s(cases) for metric, case in CASES.items()}
    ratios["generate"] = hf_cases.generate_floor_s(generation) / generation["vlm_generate"]["median_s"]
    return {
        "ratios": ratios,
        "edits": vision_edits(vlm, tokens, pixels, layer),
        "cache_entries": results["cache_bytes"][1]["all"]["n_tensors"],
        "max_abs_logit_diff_vs_hf": results["forward"][1]["max_abs_logit_diff_vs_hf"],
        "same_tokens_as_hf": results["generate"]["same_tokens_as_hf"],
        "versions": {"vlm-lens": version("vlm-lens"), "transformer-lens": version("transformer-lens")},
    }
