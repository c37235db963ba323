"""Prompt-prefix control and the probe-vs-output gap.

Prefix control: image tokens only see the text before them, so a text prefix placed before the
image (``with_prefix``) lets the question shape the image keys and values; ``compare_prefix``
scores a probe with and without it. Probe-vs-output gap: on multiple-choice items, how often a
linear probe on the LM's image values answers right where the model's own output does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from vlm_lens.analysis.evaluate import answer_token
from vlm_lens.analysis.probing.fit import fit_logistic
from vlm_lens.analysis.probing.readout import KVReadout, read_kv
from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs


def with_prefix(prompt: str, prefix: str, placeholder: str = "<image>") -> str:
    """Insert ``prefix`` (and a space) right before the first image placeholder.

    Example:
        >>> with_prefix("USER: <image>\\nwhat colour is the circle ? ASSISTANT:", "the circle")
        'USER: the circle <image>\\nwhat colour is the circle ? ASSISTANT:'
    """
    if placeholder not in prompt:
        raise ValueError(f"prompt has no {placeholder!r} placeholder to put the prefix before: {prompt!r}.")
    head, tail = prompt.split(placeholder, 1)
    return f"{head}{prefix.strip()} {placeholder}{tail}"


def prepare_batches(model: HookedVLM, items: Sequence[Any], *, batch_size: int = 16,
                    prompt: Callable[[Any], str] | None = None) -> list[VLMInputs]:
    """``VLMInputs`` batches for items with ``.image`` and ``.prompt``; ``prompt(item)`` overrides the text
    (e.g. ``lambda it: with_prefix(it.prompt, it.question)``, or a prompt in another chat format)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not items:
        raise ValueError("items is empty.")
    text = prompt or (lambda it: it.prompt)
    return [model.prepare([text(it) for it in items[s:s + batch_size]],
                          images=[[it.image] for it in items[s:s + batch_size]])
            for s in range(0, len(items), batch_size)]


def compare_prefix(model: HookedVLM, items: Sequence[Any], prefix: str | Callable[[Any], str],
                   score: Callable[[KVReadout], torch.Tensor], *, batch_size: int = 16,
                   **read_kwargs: Any) -> dict[str, torch.Tensor]:
    """Probe scores without and with a text prefix before the image.

    ``prefix`` is a string or ``item -> str`` (e.g. the item's question); ``score`` maps a readout to
    per-layer scores, e.g. ``lambda r: linear_probe_segmentation(r.stack("v"), masks, n_train=20)``.
    Returns ``{"without": ..., "with": ..., "delta": with - without}``.
    """
    make = prefix if callable(prefix) else (lambda it: prefix)
    runs = {}
    for name, text in (("without", None), ("with", lambda it: with_prefix(it.prompt, make(it)))):
        batches = prepare_batches(model, items, batch_size=batch_size, prompt=text)
        runs[name] = torch.as_tensor(score(read_kv(model, batches, **read_kwargs))).float()
    return {**runs, "delta": runs["with"] - runs["without"]}


# --------------------------------------------------------------------------- probe vs output gap
def pool_regions(features: Float[torch.Tensor, "n_layers n_images rows cols dim"],
                 regions: Bool[torch.Tensor, "n_images rows cols"] | None = None
                 ) -> Float[torch.Tensor, "n_layers n_images dim"]:
    """Mean feature over each image's region (e.g. ``item.target_mask``); all patches when None."""
    if regions is None:
        return features.float().mean((2, 3))
    if regions.shape != features.shape[1:4]:
        raise ValueError(f"regions have shape {tuple(regions.shape)}, features' grids {tuple(features.shape[1:4])}.")
    empty = (~regions.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"images {empty[:5]} have an empty region; drop them or pass regions=None to pool all patches.")
    w = regions.float()
    return torch.einsum("lnrcd,nrc->lnd", features.float(), w) / w.sum((1, 2))[None, :, None]


def answer_probe(features: Float[torch.Tensor, "n_layers n_images rows cols dim"], labels: Int[torch.Tensor, " n_images"],
                 *, n_train: int, regions: Bool[torch.Tensor, "n_images rows cols"] | None = None,
                 weight_decay: float = 1e-2, progress: bool = False) -> Bool[torch.Tensor, "n_layers n_test"]:
    """Per layer, whether a multinomial logistic probe on pooled image features (``pool_regions``),
    trained on the first ``n_train`` items, predicts each remaining item's answer index ``labels``."""
    n_images = features.shape[1]
    if len(labels) != n_images or not 1 <= n_train < n_images:
        raise ValueError(f"need one label per image ({n_images}) and 1 <= n_train < {n_images}; got "
                         f"{len(labels)} labels and n_train={n_train}.")
    pooled = pool_regions(features, regions)
    n_classes = int(labels.max()) + 1
    correct = []
    for layer in tqdm(range(len(pooled)), disable=not progress, desc="answer probe"):
        probe = fit_logistic(pooled[layer, :n_train], labels[:n_train], n_classes=n_classes, weight_decay=weight_decay)
        correct.append(probe.predict(pooled[layer, n_train:]) == labels[n_train:])
    return torch.stack(correct)


@torch.no_grad()
def choice_correct(model: HookedVLM, items: Sequence[Any], choices: Sequence[str], *, batch_size: int = 16
                   ) -> Bool[torch.Tensor, " n_items"]:
    """Whether the model's next-token logits, restricted to the answer ``choices``, pick each item's answer."""
    missing = sorted({it.answer for it in items} - set(choices))
    if missing:
        raise ValueError(f"answers {missing} are not among the choices {list(choices)}.")
    ids = torch.tensor([answer_token(model.tokenizer, c) for c in choices])
    truth = torch.tensor([list(choices).index(it.answer) for it in items])
    preds = [model(batch)[:, -1, ids.to(model.cfg.device)].argmax(-1).cpu()
             for batch in prepare_batches(model, items, batch_size=batch_size)]
    return torch.cat(preds) == truth


@dataclass(frozen=True)
class GapResult:
    """Probe vs model output on the same items (per layer for the probe)."""

    probe_accuracy: Float[torch.Tensor, " n_layers"]
    model_accuracy: float
    probe_right_model_wrong: Float[torch.Tensor, " n_layers"]  # fraction of all items
    recovered: Float[torch.Tensor, " n_layers"]  # P(probe right | model wrong); nan if the model is never wrong
    n_items: int

    def __repr__(self) -> str:
        best = int(self.probe_accuracy.argmax())
        return (f"GapResult(n_items={self.n_items}, model_accuracy={self.model_accuracy:.3f}, best layer {best}: "
                f"probe_accuracy={float(self.probe_accuracy[best]):.3f}, "
                f"recovered={float(self.recovered[best]):.3f})")


def probe_output_gap(probe_correct: Bool[torch.Tensor, "n_layers n_items"], model_correct: Bool[torch.Tensor, " n_items"]
                     ) -> GapResult:
    """How often the probe answers right where the model's output does not (the "perception gap").

    Example:
        >>> probe = torch.tensor([[True, False, True, False], [True, True, True, False]])  # e.g. answer_probe
        >>> probe_output_gap(probe, torch.tensor([True, False, False, True]))  # e.g. choice_correct
        GapResult(n_items=4, model_accuracy=0.500, best layer 1: probe_accuracy=0.750, recovered=1.000)
    """
    if probe_correct.shape[1] != len(model_correct):
        raise ValueError(f"probe scored {probe_correct.shape[1]} items but the model {len(model_correct)}; "
                         "score the same (test) items with both.")
    wrong = ~model_correct.bool()
    both = (probe_correct & wrong).float()
    recovered = both.sum(1) / wrong.sum() if wrong.any() else torch.full((len(probe_correct),), float("nan"))
    return GapResult(probe_correct.float().mean(1), float(model_correct.float().mean()), both.mean(1),
                     recovered, len(model_correct))
