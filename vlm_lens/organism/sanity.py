"""Held-out accuracy and the ground-truth ablation check for the organism, through the HF model.

Accuracy: plain argmax over the whole vocabulary at the last prompt position must be the answer token
(for a two-word answer, each word must be the argmax given the words before it).
Ablation: at the projector output (``model.model.multi_modal_projector``), replace the visual tokens of
the asked-about object's patches (``item.target_mask``) with the mean visual token over many images;
as a control, replace the same number of random background patches (covered by no object).

Re-run on the shipped weights with ``python -m vlm_lens.organism.sanity [--organism scenes]``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from vlm_lens.organism import build, data


@contextmanager
def replace_visual_tokens(model, mask: torch.Tensor | None, value: torch.Tensor | None):
    """Within the block, projector outputs at ``mask`` (bool [B, n_patches]) are set to ``value``."""
    if mask is None:
        yield
        return

    def hook(module, inputs, output):
        out = output.clone()
        out[mask.to(out.device)] = value.to(out.dtype).to(out.device)
        return out

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def predictions(
    model, processor, items: Sequence, masks: torch.Tensor | None = None, value=None, batch_size: int = 100
) -> np.ndarray:
    """Bool [len(items)]: whether the argmax at the last prompt position is the answer token; for answers
    of several words, whether every answer word is the argmax given the words before it (teacher forcing:
    exactly when greedy decoding writes the answer)."""
    model.eval()
    correct = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        several = any(" " in it.answer for it in chunk)
        batch = build.encode(processor, chunk, with_answers=several)
        sub = None if masks is None else masks[start : start + batch_size]
        with replace_visual_tokens(model, sub, value):
            logits = model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
                pixel_values=batch["pixel_values"].to(model.device, model.dtype),
            ).logits
        answers = batch["answers"]
        at = (batch["last"][:, None] + torch.arange(answers.shape[1])).clamp(max=logits.shape[1] - 1)
        guess = logits.argmax(-1).cpu().gather(1, at)
        correct.append(((guess == answers) | (answers == -100)).all(1).numpy())
    return np.concatenate(correct)


def accuracy_by_type(items: Sequence, correct: np.ndarray) -> dict[str, float]:
    groups = defaultdict(list)
    for it, ok in zip(items, correct, strict=True):
        groups[it.question_type].append(ok)
    kinds = dict.fromkeys(it.question_type for it in items)
    out = {kind: float(np.mean(groups[kind])) for kind in kinds}
    out["all"] = float(np.mean(correct))
    return out


@torch.no_grad()
def mean_visual_token(model, processor, items: Sequence, batch_size: int = 100) -> torch.Tensor:
    """Mean projector output over all patches of ``items``' images: float [text_width]."""
    captured = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda module, inputs, output: captured.append(output.reshape(-1, output.shape[-1]).float())
    )
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            pixels = build.encode(processor, chunk)["pixel_values"].to(model.device, model.dtype)
            model.model.get_image_features(pixel_values=pixels)
    finally:
        handle.remove()
    return torch.cat(captured).mean(0)


def background_masks(items: Sequence, seed: int = 0) -> torch.Tensor:
    """Per item, as many random background patches as the item's target has: bool [B, n_patches]."""
    rng = np.random.default_rng(seed)
    grid = items[0].target_mask.shape[0] if items else 0
    out = np.zeros((len(items), grid * grid), dtype=bool)
    for i, it in enumerate(items):
        covered = np.zeros((grid, grid), dtype=bool)
        for obj in it.objects:
            covered |= obj.patch_mask
        free = np.flatnonzero(~covered.reshape(-1))
        k = int(it.target_mask.sum())
        out[i, rng.choice(free, size=min(k, len(free)), replace=False)] = True
    return torch.from_numpy(out)


def ablation_check(model, processor, items: Sequence, mean_items: Sequence, seed: int = 0) -> dict:
    """Accuracy drop (in points) from mean-ablating the target patches vs as many background patches,
    on the items whose target mask is non-empty."""
    targeted = [it for it in items if it.target_mask.any()]
    mean = mean_visual_token(model, processor, mean_items)
    target = torch.from_numpy(np.stack([it.target_mask.reshape(-1) for it in targeted]))
    clean = predictions(model, processor, targeted)
    on_target = predictions(model, processor, targeted, target, mean)
    on_background = predictions(model, processor, targeted, background_masks(targeted, seed), mean)
    return {
        "n_items": len(targeted),
        "clean_accuracy": float(clean.mean()),
        "target_ablated_accuracy": float(on_target.mean()),
        "background_ablated_accuracy": float(on_background.mean()),
        "target_drop_points": float(100 * (clean.mean() - on_target.mean())),
        "background_drop_points": float(100 * (clean.mean() - on_background.mean())),
        "target_drop_by_type": {
            k: 100 * (accuracy_by_type(targeted, clean)[k] - v)
            for k, v in accuracy_by_type(targeted, on_target).items()
        },
    }


def evaluate(model, processor, size: int = 500, seed: int = 0, organism: str = "shapes") -> dict:
    """Held-out accuracy per question type and the ablation check, on ``ShapesDataset("test", seed)``."""
    items = list(data.ShapesDataset("test", seed, size, organism=organism))
    mean_items = list(data.ShapesDataset("test", seed + 1000, size, organism=organism))
    accuracy = accuracy_by_type(items, predictions(model, processor, items))
    return {"test_accuracy": accuracy, "ablation": ablation_check(model, processor, items, mean_items, seed)}


def main(argv: Sequence[str] | None = None) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlm_lens.organism import path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--organism", default="shapes", help="which shipped organism's test items to use")
    parser.add_argument("--folder", default=None, help="model folder (default: the shipped organism's)")
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    folder = args.folder or str(path(args.organism))
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    print(json.dumps(evaluate(model, processor, args.size, args.seed, args.organism), indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
