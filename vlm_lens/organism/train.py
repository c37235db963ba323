"""Train a model organism from scratch on CPU and save it in Hugging Face format.

    python -m vlm_lens.organism.train --out vlm_lens/organism/weights                   # shapes
    python -m vlm_lens.organism.train --organism scenes --out vlm_lens/organism/weights_scenes

Each training sequence is one image with ``--turns`` questions as a multi-turn chat
("USER: q1\n<image> ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>..."); its first turn is exactly the
single-question prompt of ``ShapesDataset``, so the evaluation format is part of training. The loss is
cross-entropy on each answer token (one word, or two for the scenes organism's ``describe``) and the
``</s>`` after the answer, plus an auxiliary per-patch loss: throwaway linear heads on the projector output
predict each patch's object colour, object shape (or background) and grid cell. The heads are not saved;
they keep object information local to the object's patch, which is what the ablation check in
``sanity.py`` relies on. With ``--target-weight`` (the scenes default) another throwaway head on the
language model's middle layer predicts, at each image token, whether the patch belongs to the objects the
answer needs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from vlm_lens.organism import build, data, sanity

# Per organism: the defaults the shipped weights were trained with (any flag overrides them).
DEFAULTS = {
    "shapes": {"steps": 1500, "vision_width": 64, "vision_layers": 3, "text_layers": 4, "text_mlp": 256,
               "target_weight": 0.0},
    "scenes": {"steps": 2000, "vision_width": 96, "vision_layers": 4, "text_layers": 8, "text_mlp": 384,
               "target_weight": 1.0},
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a vlm_lens model organism")
    p.add_argument("--out", required=True, help="folder for config, safetensors, tokenizer, processor")
    p.add_argument("--organism", default="shapes", choices=tuple(DEFAULTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument(
        "--target-weight",
        type=float,
        default=None,
        help="weight of the auxiliary loss that asks a linear head on the language model's residual stream "
        "at its middle layer, at each image token, whether the patch belongs to the objects the answer needs",
    )
    p.add_argument("--turns", type=int, default=1, help="questions per training image (a multi-turn chat)")
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        help="training images generated up front and sampled from; 0: fresh images every step",
    )
    p.add_argument(
        "--curriculum",
        default=None,
        help="object-count curriculum as 'fraction:max,...' (e.g. '0:2,0.3:3,0.5:5': images have at most two "
        "objects for the first 30 %% of steps, three until half way, then the organism's maximum)",
    )
    p.add_argument("--vision-width", type=int, default=None)
    p.add_argument("--vision-layers", type=int, default=None)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=None)
    p.add_argument("--text-mlp", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="start from the weights in this folder (a second stage)")
    p.add_argument("--data-start", type=int, default=0, help="index of the first training image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-size", type=int, default=300)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="folder where the model is saved at every validation (overwritten), to resume with --init",
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.organism].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class PatchHeads(torch.nn.Module):
    """Throwaway linear probes on the projector output, and one on the language model's middle layer
    (training only)."""

    def __init__(self, width: int, source=data, target: bool = False):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(source.COLOURS))
        self.shape = torch.nn.Linear(width, 1 + len(source.SHAPES))
        self.cell = torch.nn.Linear(width, source.CELLS * source.CELLS)
        self.target = torch.nn.Linear(width, 2) if target else None

    def loss(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            F.cross_entropy(getattr(self, name)(tokens).flatten(0, 1), labels[name].flatten())
            for name in ("colour", "shape", "cell")
        )


def max_objects_at(step: int, args) -> int | None:
    """The curriculum's object cap at ``step`` (None: no curriculum)."""
    if not args.curriculum:
        return None
    cap = None
    for part in args.curriculum.split(","):
        fraction, top = part.split(":")
        if step >= float(fraction) * args.steps:
            cap = int(top)
    return cap


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
    processor, size: int, seed: int, turns: int, start: int = 0, source=data, max_objects: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenised chats, pixel values, next-token labels (answers and the </s> after them; -100 elsewhere)
    and per-patch labels for training images ``start`` to ``start + size - 1``."""
    tok = processor.tokenizer
    indices = range(start, start + size)
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
    return pool


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(args) -> tuple[LlavaForConditionalGeneration, object]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    source = data.generator(args.organism)
    processor = build.build_processor(source)
    config = build.build_config(
        args.vision_width, args.vision_layers, args.text_width, args.text_layers, args.text_mlp, source
    )
    model = LlavaForConditionalGeneration(config)
    if args.init:
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
    heads = PatchHeads(args.text_width, source, target=args.target_weight > 0)
    n_params = sum(p.numel() for p in model.parameters())
    tqdm.write(f"model parameters: {n_params / 1e6:.2f} M")

    pool = make_pool(processor, args.pool, args.seed, args.turns, source=source) if args.pool else None
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
    middle = model.model.language_model.layers[args.text_layers // 2 - 1]
    middle.register_forward_hook(
        lambda m, i, o: captured.__setitem__("mid", o[0] if isinstance(o, tuple) else o)
    )
    val_items = list(data.ShapesDataset("test", args.seed + 1, args.eval_size, organism=args.organism))
    rng = np.random.default_rng(args.seed)

    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        model.train()
        if pool is None:
            batch = make_pool(
                processor,
                args.batch,
                args.seed,
                args.turns,
                args.data_start + step * args.batch,
                source,
                max_objects_at(step, args),
            )
        else:
            idx = torch.from_numpy(rng.integers(0, args.pool, args.batch))
            batch = {k: v[idx] for k, v in pool.items()}
        length = int(batch["length"].max())
        out = model(
            input_ids=batch["input_ids"][:, :length],
            attention_mask=batch["attention_mask"][:, :length],
            pixel_values=batch["pixel_values"],
        )
        labels = batch["labels"][:, :length]
        answer_loss = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        aux_loss = heads.loss(captured["v"], {k: batch[k] for k in ("colour", "shape", "cell")})
        loss = answer_loss + args.aux_weight * aux_loss
        target_loss = torch.zeros(())
        if heads.target is not None:
            image_rows = captured["mid"][batch["input_ids"][:, :length] == config.image_token_index]
            target_loss = F.cross_entropy(heads.target(image_rows), batch["target"].flatten())
            loss = loss + args.target_weight * target_loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(
                loss=f"{answer_loss.item():.3f}",
                aux=f"{aux_loss.item():.3f}",
                target=f"{target_loss.item():.3f}",
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val = sanity.accuracy_by_type(val_items, sanity.predictions(model, processor, val_items))
            tqdm.write(f"step {step + 1}: validation " + " ".join(f"{k}={v:.3f}" for k, v in val.items()))
            if args.checkpoint:
                model.save_pretrained(args.checkpoint)
                processor.save_pretrained(args.checkpoint)
    return model, processor


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    model, processor = train(args)
    train_seconds = time.time() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Measure through the saved folder, exactly as users load it.
    from transformers import AutoProcessor

    model = LlavaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    results = sanity.evaluate(model, processor, size=500, seed=0, organism=args.organism)
    results["train_seconds"] = round(train_seconds, 1)
    results["args"] = vars(args)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    results["folder_mb"] = round(size_mb, 2)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
