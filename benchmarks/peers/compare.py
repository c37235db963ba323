"""One peers run: each library's figures against the main run's HF reference (logits and greedy tokens)."""

from __future__ import annotations

from pathlib import Path

import torch

from peers import nnsight_calls, tl_bridge, vlm_lens_column
from peers.common import measure, projector_layer

PEERS = ("nnsight", "tl-bridge")


def parse(text: str) -> list[str]:
    """``--peers nnsight,tl-bridge`` -> ["nnsight", "tl-bridge"] (an unknown name is an error naming the known)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown or not names:
        raise ValueError(f"--peers {text!r}: known peers are {', '.join(PEERS)} (comma-separated).")
    return names


def _nnsight(
    folder: Path,
    hf: dict,
    dtype: torch.dtype,
    device: str,
    tokens,
    pixels,
    layer: int,
    n_new: int,
    rounds: int,
):
    model = nnsight_calls.load(folder, dtype, device)
    figures, logits, new_tokens = measure(
        "nnsight",
        nnsight_calls.calls(model, tokens, pixels, layer, n_new),
        hf,
        tokens,
        pixels,
        n_new,
        rounds,
        device,
    )
    figures["versions"] = {"nnsight": nnsight_calls.version()}
    return figures, logits, new_tokens


def run(
    names: list[str],
    *,
    results: dict,
    folder: Path,
    hf: dict,
    vlm,
    tokens: torch.Tensor,
    pixels: torch.Tensor,
    n_new: int,
    rounds: int,
    device: str,
    dtype: torch.dtype,
    tl_bridge_python: str | None,
) -> dict:
    """Figures per library (``vlm_lens`` from the main run, then each of ``names``), at batch 1."""
    layer = projector_layer(hf["sdpa"].config)
    with torch.no_grad():
        reference = hf["sdpa"](input_ids=tokens, pixel_values=pixels).logits.float().cpu()
    hf_tokens = torch.tensor(results["generate"]["hf_tokens"])
    libraries = {"vlm_lens": vlm_lens_column.column(results, vlm, tokens, pixels, layer)}
    for name in names:
        print(f"[peers] {name}", flush=True)
        if name == "nnsight":
            figures, logits, new_tokens = _nnsight(
                folder, hf, dtype, device, tokens, pixels, layer, n_new, rounds
            )
        else:
            figures, logits, new_tokens = tl_bridge.run(
                tl_bridge_python, folder, tokens, pixels, n_new, rounds, device, dtype
            )
        if logits is not None:
            figures["max_abs_logit_diff_vs_hf"] = (logits.float().cpu() - reference).abs().max().item()
            figures["same_tokens_as_hf"] = torch.equal(new_tokens.cpu(), hf_tokens)
            figures["tokens"] = new_tokens.tolist()
        libraries[name] = figures
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "projector_layer": layer,
        "hf_tokens": hf_tokens.tolist(),
        "libraries": libraries,
    }
