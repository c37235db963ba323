"""TransformerLens's weight processing (fold_ln, centering, value-bias folding) one group at a time.

``ProcessWeights.process_weights`` deep-copies the whole state dict in several of its steps (and upcasts
bf16/fp16 weights to float32 first), which on a 7B model means holding the language model two or three
times over. Every step only relates weights of the same block, or the embedding, or the final norm and
unembedding, so running TransformerLens's own function on one such group at a time gives the same
weights while holding one group's copies at a time (``tests/loading/test_loading_memory.py`` checks equality with
the whole-dict call). Blocks are split into attention and MLP, as each step only relates a norm to the
weights that read it, or a block's value biases to its output bias.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformer_lens.weight_processing import ProcessWeights

from vlm_lens.loading.weights import FOLDED_NORMS, drain


def folded_config(cfg: Any) -> Any:
    """The config of the model that receives folded weights: its norms no longer scale."""
    out = copy.copy(cfg)
    out.normalization_type = {"RMS": "RMSPre", "LN": "LNPre"}.get(cfg.normalization_type, cfg.normalization_type)
    return out


def process_group(name: str, part: dict[str, torch.Tensor], cfg: Any, steps: dict[str, bool]) -> dict:
    """Run TransformerLens's ``process_weights`` on one group (``part`` is consumed).

    A block's attention or MLP is processed as block 0 of a one-layer model (TransformerLens skips what
    the group does not have); the embedding and unembedding as a model with no layers, each with the
    steps that touch it.
    """
    get = lambda step: bool(steps.get(step))  # noqa: E731
    # Detached: an autograd graph back to the HF parameter would keep the source alive. The copies
    # processing makes follow their input's layout, so HF's layout (TransformerLens's shapes as
    # transposed views) carries over to the processed weights.
    part = {k: v.detach() for k, v in drain(part)}
    sub_cfg = copy.copy(cfg)
    prefix = name[:name.index(".", len("blocks.")) + 1] if name.startswith("blocks.") else ""
    if prefix:
        sub_cfg.n_layers = 1
        part = {"blocks.0." + k[len(prefix):]: v for k, v in drain(part)}
        calls = [dict(fold_ln=get("fold_ln"), center_writing_weights=get("center_writing_weights"),
                      fold_value_biases=get("fold_value_biases"))]
    elif name == "embed":
        sub_cfg.n_layers = 0
        calls = [dict(center_writing_weights=get("center_writing_weights"))]
    else:  # the unembedding: two calls, so only one extra copy of W_U exists at a time
        sub_cfg.n_layers = 0
        calls = [dict(fold_ln=get("fold_ln")), dict(center_unembed=get("center_unembed"))]
    for flags in calls:
        part = _run(part, sub_cfg, flags)
    if get("fold_ln"):
        for key in [k for k in part if k.endswith(FOLDED_NORMS)]:
            if part[key].device.type != "meta" and not torch.all(part[key] == 1):  # meta: no values
                raise ValueError(f"{name}: {key} was not folded into the following weights; cannot drop it.")
            del part[key]
    if prefix:
        part = {prefix + k[len("blocks.0."):]: v for k, v in drain(part)}
    return part


def _run(part: dict[str, torch.Tensor], cfg: Any, flags: dict[str, bool]) -> dict[str, torch.Tensor]:
    """One ``process_weights`` call with only ``flags`` on; the input dict is emptied."""
    if not any(flags.values()):
        return part
    every = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    out = ProcessWeights.process_weights(part, cfg, **{**every, **flags})
    if out is not part:
        part.clear()
    return out
