"""Evaluation harness: accuracy and answer probability of (image, question, answer) items under hooks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from vlm_lens.hooked_vlm import HookedVLM
from vlm_lens.inputs import VLMInputs

HookFactory = Callable[[VLMInputs, Sequence[Any]], list]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    mean_answer_prob: float
    correct: torch.Tensor  # bool [n_items]
    answer_probs: torch.Tensor  # [n_items]
    predictions: list[str]
    by_type: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        types = ", ".join(f"{k}={v:.3f}" for k, v in self.by_type.items())
        return f"EvalResult(accuracy={self.accuracy:.3f}, mean_answer_prob={self.mean_answer_prob:.3f}{', ' + types if types else ''})"


def answer_token(tokenizer: Any, answer: str) -> int:
    """The token id of a one-token answer as it follows the prompt."""
    ids = tokenizer.encode(" " + answer, add_special_tokens=False) or tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        warnings.warn(f"answer {answer!r} is {len(ids)} tokens; scoring its first token only.", stacklevel=2)
    return ids[0]


def _hooks_for(hooks: list | HookFactory | None, inputs: VLMInputs, items: Sequence[Any]) -> list:
    if hooks is None:
        return []
    return hooks(inputs, items) if callable(hooks) else list(hooks)


@torch.no_grad()
def evaluate(model: HookedVLM, items: Sequence[Any], *, hooks: list | HookFactory | None = None, batch_size: int = 32,
             mode: Literal["next_token", "generate"] = "next_token", max_new_tokens: int = 3,
             progress: bool = False) -> EvalResult:
    """Score items that have ``.image``, ``.prompt`` and ``.answer`` (and optionally ``.question_type``).

    ``hooks`` is a list of (name, fn) hooks, or a function ``(inputs, batch_items) -> hooks`` for hooks
    that depend on the batch (e.g. ablating each item's own object). ``mode="next_token"`` checks the
    argmax at the last prompt position; ``"generate"`` checks that the greedy continuation starts with
    the answer (hooks stay on for every generated token).
    """
    if mode not in ("next_token", "generate"):
        raise ValueError(f"mode must be 'next_token' or 'generate', got {mode!r}.")
    tokenizer = model.tokenizer
    correct, probs, predictions = [], [], []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, disable=not progress, desc="evaluate"):
        batch = items[start:start + batch_size]
        inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
        answers = torch.tensor([answer_token(tokenizer, it.answer) for it in batch])
        fwd_hooks = _hooks_for(hooks, inputs, batch)
        logits = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks)[:, -1].float()
        p = logits.softmax(-1)[torch.arange(len(batch)), answers.to(logits.device)].cpu()
        if mode == "next_token":
            pred = logits.argmax(-1).cpu()
            ok = pred == answers
            texts = [tokenizer.decode([t]).strip() for t in pred.tolist()]
        else:
            texts = model.generate(inputs, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, return_type="new_str")
            texts = [t.strip() for t in texts]
            ok = torch.tensor([t.split()[0] == it.answer if t.split() else False for t, it in zip(texts, batch)])
        correct.append(ok)
        probs.append(p)
        predictions.extend(texts)
    correct_t, probs_t = torch.cat(correct), torch.cat(probs)
    by_type: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct_t.tolist()):
        by_type.setdefault(getattr(it, "question_type", "all"), []).append(ok)
    return EvalResult(
        accuracy=float(correct_t.float().mean()), mean_answer_prob=float(probs_t.mean()), correct=correct_t,
        answer_probs=probs_t, predictions=predictions,
        by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
    )


def compare(model: HookedVLM, items: Sequence[Any], hooks: list | HookFactory, **kwargs: Any) -> dict[str, Any]:
    """Accuracy and answer-probability change under ``hooks`` relative to the plain model."""
    base = evaluate(model, items, **kwargs)
    hooked = evaluate(model, items, hooks=hooks, **kwargs)
    return {"baseline": base, "intervened": hooked, "accuracy_drop": base.accuracy - hooked.accuracy,
            "prob_change": hooked.mean_answer_prob - base.mean_answer_prob}
