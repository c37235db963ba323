"""Training sequences for the model organisms: chats of questions about one image, tokenised with their
next-token labels, the per-patch labels and the relation head's labels (``train.py`` trains on them)."""

from __future__ import annotations

import re

import torch
from tqdm import tqdm

from vlm_lens.organism import build, data, scenes

# What the relation head can predict (see ``relation_labels``): number of labels, classes per label.
RELATION_TARGETS = {"cells": None, "comparisons": (4, 2), "asked": (1, 4)}


def conversation(split: str, seed: int, index: int, turns: int, source=data, max_objects: int | None = None):
    """Image ``index`` with ``turns`` questions as one chat, and the first question's target mask; the first
    turn is exactly the single-question prompt users send (``ShapesDataset`` item ``index``), so training
    covers the evaluation format."""
    cap = {} if max_objects is None else {"max_objects": max_objects}
    image, objects = source.make_scene(split, seed, index, **cap)
    questions = [source.make_question(objects, split, seed, index, t) for t in range(turns)]
    qa = [q[:2] for q in questions]
    text = data.prompt_for(qa[0][0])
    for (_, answer), (question, _) in zip(qa, qa[1:]):  # noqa: B905
        text += f" {answer}</s>USER: {question} ASSISTANT:"
    text += f" {qa[-1][1]}</s>"
    return image, objects, text, questions[0][3]


def make_pool(
    processor,
    size: int,
    seed: int,
    turns: int,
    start: int = 0,
    source=data,
    max_objects: int | None = None,
    oversample: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenised chats, pixel values, next-token labels (answers and the </s> after them; -100 elsewhere)
    and per-patch labels for training images ``start`` to ``start + size - 1`` (with ``oversample``, some of
    them replaced by images whose first question has the given type: ``oversampled_indices``)."""
    tok = processor.tokenizer
    indices = oversampled_indices(start, size, oversample, source)
    chats = [
        conversation("train", seed, i, turns, source, max_objects)
        for i in (tqdm(indices, desc="data", leave=False) if size > 1000 else indices)
    ]
    n_image_tokens = source.GRID * source.GRID
    texts = [text.replace("<image>", "<image>" * n_image_tokens) for _, _, text, _ in chats]
    ids = tok(texts, return_tensors="pt", padding=True)
    input_ids = ids["input_ids"]
    # Answers run from the token right after "assistant :" to the </s> that ends them, inclusive.
    after_prompt = torch.zeros_like(input_ids, dtype=torch.bool)
    after_prompt[:, 2:] = (input_ids[:, :-2] == tok.convert_tokens_to_ids("assistant")) & (
        input_ids[:, 1:-1] == tok.convert_tokens_to_ids(":")
    )
    starts, ends = after_prompt.long().cumsum(1), (input_ids == tok.eos_token_id).long().cumsum(1)
    supervised = (starts > ends) | ((input_ids == tok.eos_token_id) & (starts == ends) & (starts > 0))
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = torch.where(supervised[:, 1:], input_ids[:, 1:], -100)
    pool = {
        "input_ids": input_ids,
        "attention_mask": ids["attention_mask"],
        "labels": labels,
        "pixel_values": build.pixel_values(processor, [chat[0] for chat in chats]),
        "length": ids["attention_mask"].sum(1),
    }
    pool.update(build.patch_labels([chat[1] for chat in chats], source, [chat[3] for chat in chats]))
    pool["prompt_end"] = after_prompt.long().argmax(1) - 1  # the first question's last prompt position
    labels = [relation_labels(text, objects, source) for _, objects, text, _ in chats]
    for target in RELATION_TARGETS:
        pool[f"relation_{target}"] = torch.tensor([label[target] for label in labels])
    return pool


# The first question of a chat that is ``relative`` (the scenes organism's wording, ``scenes._relative``).
_RELATIVE = re.compile(rf"^USER: is the (\w+) (\w+) ({'|'.join(scenes.RELATIONS)}) the (\w+) \?")


def relation_shape(target: str, source=data) -> tuple[int, int]:
    """(labels, classes per label) of the relation head for ``target``."""
    return RELATION_TARGETS[target] or (2, source.CELLS * source.CELLS)


def relation_labels(text: str, objects, source=data) -> dict[str, tuple[int, ...]]:
    """The relation head's labels for a chat whose first question is ``relative`` ("is the <colour> <shape>
    <relation> the <shape> ?", objects A and B), per target: ``cells`` the two objects' cells
    (``row * CELLS + col``), ``comparisons`` whether A's column is less / greater than B's and A's row less /
    greater than B's (whether each of ``scenes.RELATIONS`` holds), ``asked`` the index of the asked relation
    in ``scenes.RELATIONS``. -100 (ignored) everywhere for any other first question."""
    match = _RELATIVE.match(text)
    if match is None:
        return {t: (-100,) * relation_shape(t, source)[0] for t in RELATION_TARGETS}
    colour, shape, relation, other = match.groups()
    a = next(o for o in objects if o.colour == colour and o.shape == shape)
    b = next(o for o in objects if o.shape == other)
    return {
        "cells": tuple(int(r * source.CELLS + c) for r, c in (a.cell, b.cell)),
        "comparisons": tuple(int(scenes.holds(r, a, b)) for r in scenes.RELATIONS),
        "asked": (scenes.RELATIONS.index(relation),),
    }


def oversampled_indices(start: int, size: int, oversample: str | None, source=data) -> list[int]:
    """Image indices ``start .. start + size - 1``; with ``oversample`` "TYPE:FRACTION", the first
    ``round(FRACTION * size)`` of them are replaced by the indices ``n * len(QUESTION_TYPES) + k`` (``k``: the
    type's position; the question type cycles with the image index, so the first question is of that type)
    for ``n`` from ``10**8 + start`` on: images far from the ordinary indices, so no image repeats."""
    indices = list(range(start, start + size))
    if not oversample:
        return indices
    kind, fraction = oversample.split(":")
    if kind not in source.QUESTION_TYPES:
        raise ValueError(
            f"--oversample: unknown question type {kind!r}; expected one of {source.QUESTION_TYPES}"
        )
    n_types, k = len(source.QUESTION_TYPES), source.QUESTION_TYPES.index(kind)
    n = round(float(fraction) * size)
    indices[:n] = [(10**8 + start + i) * n_types + k for i in range(n)]
    return indices
