"""What every peer library is asked to do, and the one way its answers are timed and checked.

A peer gives a ``Calls``: its own way of running the forward pass, caching the residual stream, hooking
each layer with a no-op, caching everything, generating greedily with its KV cache, and editing the
vision layer the projector reads (its output, and its attention pattern). ``measure`` times those calls
interleaved with HF's in the same rounds (``timing.interleaved``) and runs the edits.

Only torch, transformers and the benchmark's own ``timing`` / ``hf_cases`` are imported: the
TransformerLens 4 environment runs this module too (``tl_bridge_child.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import hf_cases
import torch
from timing import interleaved

# (key, what the ratio divides): forward-pass cases are seconds over the HF floor in the same rounds
FORWARD_METRICS = ("forward", "cache_resid", "noop_hook", "cache_all")
# Two ways to edit a value: hand back a new one ("replace": a hook's return value, nnsight's
# ``.output = x``) or write into the tensor the model holds ("in place": ``value[...] = x``).
EDIT_IDIOMS = ("replace", "in place")


@dataclass
class Calls:
    """One library's calls on the benchmark model and inputs (batch 1)."""

    forward: Callable[[], torch.Tensor]  # logits [batch, pos, d_vocab]
    cache_resid: Callable[[], object]  # every vision and language-model layer's output (residual stream)
    noop_hook: Callable[[], object]  # one hook per language-model layer that changes nothing
    cache_all: Callable[[], object]  # the library's "cache everything"; .keys() lists its entries
    generate: Callable[[], torch.Tensor]  # the new tokens [batch, n_new], greedy, KV cache on
    # idiom -> logits with the output of the vision layer the projector reads set to zero
    edit_output: dict[str, Callable[[], torch.Tensor]]
    # idiom -> logits with that layer's attention pattern made uniform
    edit_pattern: dict[str, Callable[[], torch.Tensor]]
    # the setting the edits run under (and their unedited reference), if not the timed one
    edit_mode: Callable[[], contextlib.AbstractContextManager] = field(default=contextlib.nullcontext)


def projector_layer(hf_config) -> int:
    """Index of the vision block whose output the projector reads (LLaVA's ``vision_feature_layer``:
    HF's ``hidden_states[k]`` is block ``k - 1``'s output, negative ``k`` counts from the end)."""
    layer, n_layers = hf_config.vision_feature_layer, hf_config.vision_config.num_hidden_layers
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: the edits need one feature layer.")
    return (layer + n_layers + 1 if layer < 0 else layer) - 1


def zeros(value: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(value)


def uniform(pattern: torch.Tensor) -> torch.Tensor:
    return torch.full_like(pattern, 1.0 / pattern.shape[-1])


def hook_edits(run_with_hooks: Callable[..., torch.Tensor], name: str, edit: Callable) -> dict:
    """TransformerLens-style hooks (``fn(value, hook)``) on ``name``, for libraries with
    ``run_with_hooks(fwd_hooks=...)``: one returns the edited value, one writes it in place."""

    def replace(value, hook):
        return edit(value)

    def in_place(value, hook):
        value[...] = edit(value)

    return {
        "replace": lambda: run_with_hooks(fwd_hooks=[(name, replace)]),
        "in place": lambda: run_with_hooks(fwd_hooks=[(name, in_place)]),
    }


def edit_diffs(
    forward: Callable[[], torch.Tensor],
    edit_output: dict,
    edit_pattern: dict,
    edit_mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """Max |logits difference| each edit makes against the same library's unedited ``forward``."""
    with torch.no_grad(), edit_mode():
        reference = forward().float()
        return {
            kind: {idiom: (fn().float() - reference).abs().max().item() for idiom, fn in edits.items()}
            for kind, edits in (("output", edit_output), ("pattern", edit_pattern))
        }


def edit_tolerance(dtype: str) -> float:
    """How far an edit must move the logits to count: beyond fp32 parity, or bf16/fp16 rounding."""
    return 1e-4 if dtype == "float32" else 5e-2


def reached(diff: float, dtype: str) -> bool:
    return diff > edit_tolerance(dtype)


def measure(
    name: str,
    calls: Calls,
    hf: dict,
    tokens: torch.Tensor,
    pixels: torch.Tensor,
    n_new: int,
    rounds: int,
    device: str,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Time ``calls`` interleaved with HF's forward and generation; returns (figures, logits, new tokens).

    Figures: ``ratios`` (forward-pass cases: median seconds over the HF floor of the same rounds;
    ``generate``: tokens/s over HF's best), every sample, the edits' logit differences and the entries of
    the full cache. The caller compares the logits and tokens with its own HF reference."""
    forward = {f"{name}:{metric}": getattr(calls, metric) for metric in FORWARD_METRICS}
    with torch.no_grad():
        logits, new_tokens = calls.forward(), calls.generate()
        cache_entries = len(calls.cache_all().keys())
        timing = interleaved({**hf_cases.forward_cases(hf, tokens, pixels), **forward}, rounds, device=device)
        generation = interleaved(
            {**hf_cases.generate_cases(hf, tokens, pixels, n_new), f"{name}:generate": calls.generate},
            max(1, rounds // 2),
            device=device,
        )
    floor = hf_cases.floor_s(timing)
    ratios = {metric: timing[f"{name}:{metric}"]["median_s"] / floor for metric in FORWARD_METRICS}
    ratios["generate"] = hf_cases.generate_floor_s(generation) / generation[f"{name}:generate"]["median_s"]
    figures = {
        "ratios": ratios,
        "timing": {**timing, **generation},
        "edits": edit_diffs(calls.forward, calls.edit_output, calls.edit_pattern, calls.edit_mode),
        "cache_entries": cache_entries,
        "new_tokens": n_new,
        "rounds": rounds,
    }
    return figures, logits, new_tokens
