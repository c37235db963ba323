"""Evaluation harness: accuracy and answer probability of (image, question, answer) items under hooks.

An answer of several tokens (e.g. "red circle") is scored under teacher forcing: the batch's prompts are
run with their answers appended, and an item is correct only when every answer token is the argmax given
the tokens before it (exactly when greedy decoding writes the answer). Hook factories then see those
longer inputs; ``answer_positions`` gives the positions whose logits predict the answer either way.
"""

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
    mean_answer_prob: float  # of the whole answer: the product of its tokens' teacher-forced probabilities
    correct: torch.Tensor  # bool [n_items]
    answer_probs: torch.Tensor  # [n_items]
    predictions: list[str]
    by_type: dict[str, float] = field(default_factory=dict)

    def __repr__(self) -> str:
        types = ", ".join(f"{k}={v:.3f}" for k, v in self.by_type.items())
        return f"EvalResult(accuracy={self.accuracy:.3f}, mean_answer_prob={self.mean_answer_prob:.3f}{', ' + types if types else ''})"


def answer_tokens(tokenizer: Any, answer: str, prompt: str | None = None) -> list[int]:
    """The token ids of ``answer`` as it follows ``prompt`` after a space: the tail of the encoded
    ``prompt + " " + answer`` when the encoded prompt is its prefix (so merges across the boundary, as
    SentencePiece makes, are read as the model sees them), else ``" " + answer`` encoded alone."""
    if prompt is not None:
        head = tokenizer.encode(prompt, add_special_tokens=False)
        whole = tokenizer.encode(f"{prompt} {answer}", add_special_tokens=False)
        if whole[: len(head)] == head and len(whole) > len(head):
            return whole[len(head) :]
    ids = tokenizer.encode(" " + answer, add_special_tokens=False) or tokenizer.encode(
        answer, add_special_tokens=False
    )
    if not ids:
        raise ValueError(f"answer {answer!r} encodes to no tokens; give a non-empty answer.")
    return ids


def answer_token(tokenizer: Any, answer: str) -> int:
    """The token id of a one-token answer as it follows the prompt."""
    ids = answer_tokens(tokenizer, answer)
    if len(ids) != 1:
        warnings.warn(f"answer {answer!r} is {len(ids)} tokens; scoring its first token only.", stacklevel=2)
    return ids[0]


def answer_positions(model: HookedVLM, inputs: VLMInputs, batch: Sequence[Any]) -> list[torch.Tensor]:
    """Per row of ``inputs`` (built for ``batch``), the positions whose logits predict the answer's tokens:
    the last prompt position and, when the rows hold their answers (``evaluate``'s teacher forcing, told
    apart by every row ending in its item's answer tokens), each answer token but the last.

    Example (a hook factory that stops the answer from reading the image):
        >>> from vlm_lens.analysis import knockout_hooks
        >>> def hide_image(inputs, batch):
        ...     image = [inputs.layout.grid(b).flatten() for b in range(len(batch))]
        ...     where = answer_positions(model, inputs, batch)
        ...     return knockout_hooks(where, image, "all", n_layers=model.cfg.n_layers)
        >>> evaluate(model, items).accuracy, evaluate(model, items, hooks=hide_image).accuracy
        (1.0, 0.375)
    """
    ids = [answer_tokens(model.tokenizer, it.answer, it.prompt) for it in batch]
    ends = [int(inputs.attention_mask[b].nonzero().max()) for b in range(len(batch))]
    forced = any(len(a) > 1 for a in ids) and all(
        inputs.tokens[b, end - len(a) + 1 : end + 1].tolist() == a
        for b, (end, a) in enumerate(zip(ends, ids))
    )
    return [torch.arange(end - len(a), end) if forced else torch.tensor([end]) for end, a in zip(ends, ids)]


def _prepare(model: HookedVLM, batch: Sequence[Any], start: int = 0) -> tuple[VLMInputs, list[list[int]]]:
    """The batch's inputs (answers appended under teacher forcing) and each item's answer tokens; ``start``:
    the index of the batch's first item (for error messages)."""
    tokenizer = model.tokenizer
    ids = [answer_tokens(tokenizer, it.answer, it.prompt) for it in batch]
    forced = any(len(a) > 1 for a in ids)
    texts = [f"{it.prompt} {it.answer}" if forced else it.prompt for it in batch]
    inputs = model.prepare(texts, images=[[it.image] for it in batch])
    if forced:
        for b, answer in enumerate(ids):
            end = int(inputs.attention_mask[b].nonzero().max())
            tail = inputs.tokens[b, end - len(answer) + 1 : end + 1].tolist()
            if tail != answer:
                raise ValueError(
                    f"item {start + b}: {batch[b].prompt!r} + ' ' + {batch[b].answer!r} ends in tokens {tail}, "
                    f"not the answer's own {answer}; end prompts so that the answer tokenizes alike "
                    "after them (e.g. with a space or a colon)."
                )
    return inputs, ids


def _hooks_for(hooks: list | HookFactory | None, inputs: VLMInputs, items: Sequence[Any]) -> list:
    if hooks is None:
        return []
    return hooks(inputs, items) if callable(hooks) else list(hooks)


def _score_next_tokens(
    model: HookedVLM, inputs: VLMInputs, batch: Sequence[Any], ids: list[list[int]], fwd_hooks: list
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(correct, answer probability, predicted text) per item from one forward pass."""
    logits = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks).float()
    correct, probs, texts = [], [], []
    for b, (where, answer) in enumerate(zip(answer_positions(model, inputs, batch), ids)):
        rows = logits[b, where.to(logits.device)]
        target = torch.tensor(answer, device=rows.device)
        guess = rows.argmax(-1)
        correct.append(bool((guess == target).all()))
        probs.append(float(rows.softmax(-1).gather(1, target[:, None]).prod()))
        texts.append(model.tokenizer.decode(guess.tolist()).strip())
    return torch.tensor(correct), torch.tensor(probs), texts


@torch.no_grad()
def evaluate(
    model: HookedVLM,
    items: Sequence[Any],
    *,
    hooks: list | HookFactory | None = None,
    batch_size: int = 32,
    mode: Literal["next_token", "generate"] = "next_token",
    max_new_tokens: int = 3,
    progress: bool = False,
) -> EvalResult:
    """Score items that have ``.image``, ``.prompt`` and ``.answer`` (and optionally ``.question_type``).

    ``hooks`` is a list of (name, fn) hooks, or a function ``(inputs, batch_items) -> hooks`` for hooks
    that depend on the batch (e.g. ablating each item's own object). ``mode="next_token"`` checks the
    argmax at the last prompt position, and for an answer of several tokens every answer token under
    teacher forcing (see the module's docstring and ``answer_positions``); ``"generate"`` checks that the
    greedy continuation starts with the answer's words (hooks stay on for every generated token; a hook
    factory is called again for the prompts alone when the scored inputs held the answers).
    """
    if mode not in ("next_token", "generate"):
        raise ValueError(f"mode must be 'next_token' or 'generate', got {mode!r}.")
    if not len(items):
        raise ValueError("evaluate needs at least one item; got an empty sequence.")
    correct, probs, predictions = [], [], []
    starts = range(0, len(items), batch_size)
    for start in tqdm(starts, disable=not progress, desc="evaluate"):
        batch = items[start : start + batch_size]
        inputs, ids = _prepare(model, batch, start)
        fwd_hooks = _hooks_for(hooks, inputs, batch)
        ok, p, texts = _score_next_tokens(model, inputs, batch, ids, fwd_hooks)
        if mode == "generate":
            if max(map(len, ids)) > 1:  # the scored inputs hold the answers: generate from the prompts alone
                inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
                fwd_hooks = _hooks_for(hooks, inputs, batch)
            texts = model.generate(
                inputs, max_new_tokens=max_new_tokens, fwd_hooks=fwd_hooks, return_type="new_str"
            )
            texts = [t.strip() for t in texts]
            ok = torch.tensor(
                [t.split()[: len(it.answer.split())] == it.answer.split() for t, it in zip(texts, batch)]
            )
        correct.append(ok)
        probs.append(p)
        predictions.extend(texts)
    correct_t, probs_t = torch.cat(correct), torch.cat(probs)
    by_type: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct_t.tolist()):
        by_type.setdefault(getattr(it, "question_type", "all"), []).append(ok)
    return EvalResult(
        accuracy=float(correct_t.float().mean()),
        mean_answer_prob=float(probs_t.mean()),
        correct=correct_t,
        answer_probs=probs_t,
        predictions=predictions,
        by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())},
    )


def compare(
    model: HookedVLM, items: Sequence[Any], hooks: list | HookFactory, **kwargs: Any
) -> dict[str, Any]:
    """Accuracy and answer-probability change under ``hooks`` relative to the plain model."""
    base = evaluate(model, items, **kwargs)
    hooked = evaluate(model, items, hooks=hooks, **kwargs)
    return {
        "baseline": base,
        "intervened": hooked,
        "accuracy_drop": base.accuracy - hooked.accuracy,
        "prob_change": hooked.mean_answer_prob - base.mean_answer_prob,
    }
