"""The peers table: one column per library, each figure against HF measured in the same run."""

from __future__ import annotations

from peers.common import EDIT_IDIOMS, edit_tolerance, reached

RATIO_ROWS = (
    ("forward, no hooks / HF floor", "forward"),
    ("cache the residual stream (every layer's output) / HF floor", "cache_resid"),
    ("one no-op hook per language-model layer / HF floor", "noop_hook"),
    ("cache everything / HF floor", "cache_all"),
    ("greedy generation tokens/s / HF's best", "generate"),
)
NOTES = {
    "vlm_lens": "vlm_lens: its timings are the main run's batch-1 rounds (above); edits through "
    "`vision.blocks.{l}.hook_resid_post` and `vision.blocks.{l}.attn.hook_pattern` hooks.",
    "nnsight": "nnsight: `TransformersModel` over HF's `LlavaForConditionalGeneration` (HF's default "
    "attention), traced with `model.trace` / `model.generate`; residual stream = `.output.save()` of every "
    "vision and language-model layer, no-op = each language-model layer's `.output` read, everything = "
    "`tracer.cache()` (module outputs, no attention patterns); edits on the layer's `.output` and, for "
    "the pattern, on the softmax inside HF's eager attention via `.source` (the edits run with eager "
    "attention).",
    "tl-bridge": "tl-bridge: TransformerLens 4's `TransformerBridge.boot_transformers` on the same folder, "
    "run in its own environment (a subprocess), timed there against HF loaded in that environment, in "
    "the same rounds; it forces eager attention. Edits through `vision_encoder.encoder_layers.{l}` hooks.",
}


def edit_cell(diffs: dict, dtype: str) -> str:
    """Yes when every idiom (a replaced value, an in-place write) moves the logits, else which of them do."""
    moved = [idiom for idiom in EDIT_IDIOMS if reached(diffs[idiom], dtype)]
    if len(moved) == len(EDIT_IDIOMS):
        return "yes"
    return f"only {moved[0]}" if moved else "no"


def _cells(entry: dict, dtype: str) -> list[str]:
    if "error" in entry:
        return ["failed"] * (len(RATIO_ROWS) + 6)
    ratios = {metric: f"{ratio:.2f}x" for metric, ratio in entry["ratios"].items()}
    if not entry["same_tokens_as_hf"]:  # a speed of wrong tokens (say, steps that skip the cache) is no speed
        ratios["generate"] += " (not HF's tokens)"
    return [
        *(ratios[metric] for _, metric in RATIO_ROWS),
        str(entry["cache_entries"]),
        f"{entry['max_abs_logit_diff_vs_hf']:.1e}",
        "yes" if entry["same_tokens_as_hf"] else "no",
        edit_cell(entry["edits"]["output"], dtype),
        edit_cell(entry["edits"]["pattern"], dtype),
        ", ".join(f"{name} {v}" for name, v in entry["versions"].items()),
    ]


def peer_table(peers: dict) -> list[str]:
    """Markdown lines of the peers section of ``results/<config>.md``."""
    libraries, dtype, layer = peers["libraries"], peers["dtype"], peers["projector_layer"]
    hf_tokens = peers["hf_tokens"][0]
    labels = [label for label, _ in RATIO_ROWS] + [
        "entries in the full cache",
        "max abs logit diff vs HF",
        "greedy generation with the KV cache gives HF's tokens",
        f"zeroing vision layer {layer}'s output (what the projector reads) reaches the logits",
        f"a uniform attention pattern in vision layer {layer} reaches the logits",
        "versions",
    ]
    columns = {name: _cells(entry, dtype) for name, entry in libraries.items()}
    lines = [
        "### Peers, batch 1 (ratios to HF measured in the same run)",
        "",
        f"HF's greedy tokens: {len(hf_tokens)} new, {len(set(hf_tokens))} distinct"
        + (" (one repeated token: the generation check is weak)" if len(set(hf_tokens)) == 1 else "")
        + f". An edit reaches the logits when it moves them by more than {edit_tolerance(dtype):.0e}"
        + "; each is tried as a replaced value and as an in-place write.",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [
        f"| {label} | " + " | ".join(cells[row] for cells in columns.values()) + " |"
        for row, label in enumerate(labels)
    ]
    lines.append("")
    lines += [f"- {NOTES[name]}" for name in libraries if name in NOTES]
    lines += [
        f"- {name} failed: `{' '.join(entry['error'].split())[-300:]}`"
        for name, entry in libraries.items()
        if "error" in entry
    ]
    return lines + [""]
