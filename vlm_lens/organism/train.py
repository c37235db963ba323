"""Train a model organism from scratch on CPU and save it in Hugging Face format.

    python -m vlm_lens.organism.train --out vlm_lens/organism/weights                   # shapes
    python -m vlm_lens.organism.train --organism scenes --out vlm_lens/organism/weights_scenes

With ``--vision-steps N`` (the scenes default: 1,750) a vision-only stage comes first: the tower and the
projector learn each patch's colour, cell and (object patches only) shape through the per-patch heads below,
before any language training; the joint stage then trains everything, the tower and projector at
``--tower-lr-scale`` times the learning rate. ``--init`` starts a further stage from a saved model.

Each training sequence is one image with ``--turns`` questions as a multi-turn chat
("USER: q1\n<image> ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>..."); its first turn is exactly the
single-question prompt of ``ShapesDataset``, so the evaluation format is part of training. The loss is
cross-entropy on each answer token (one word, or two for the scenes organism's ``describe``) and the
``</s>`` after the answer, plus an auxiliary per-patch loss: throwaway linear heads on the projector output
predict each patch's object colour, object shape (or background) and grid cell. The heads are not saved;
they keep object information local to the object's patch, which is what the ablation check in
``sanity.py`` relies on. With ``--target-weight`` (the scenes default) another throwaway head on the
language model's middle layer predicts, at each image token, whether the patch belongs to the objects the
answer needs. With ``--relation-weight`` a head on ``--relation-layer`` predicts, at the last prompt position of
a ``relative`` question, ``--relation-target``: the two objects' cells, the four comparisons of their
columns and rows, or which relation the question asks.
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

from vlm_lens.organism import batches, build, data, sanity

# Per organism: the defaults the shipped weights were trained with (any flag overrides them).
DEFAULTS = {
    "shapes": {"steps": 1500, "vision_width": 64, "vision_layers": 3, "text_layers": 4, "text_mlp": 256,
               "target_weight": 0.0, "lr": 2e-3, "vision_steps": 0, "tower_lr_scale": 1.0},
    "scenes": {"steps": 2000, "vision_width": 96, "vision_layers": 4, "text_layers": 8, "text_mlp": 384,
               "target_weight": 2.0, "lr": 1e-3, "vision_steps": 1750, "tower_lr_scale": 0.25},
}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a vlm_lens model organism")
    p.add_argument("--out", required=True, help="folder for config, safetensors, tokenizer, processor")
    p.add_argument("--organism", default="shapes", choices=tuple(DEFAULTS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--vision-steps",
        type=int,
        default=None,
        help="steps of a vision-only first stage: the tower and projector learn, through the per-patch heads "
        "alone, each patch's colour and cell and each object patch's shape, before any language training",
    )
    p.add_argument("--vision-lr", type=float, default=5e-4, help="learning rate of the vision-only stage")
    p.add_argument(
        "--tower-lr-scale",
        type=float,
        default=None,
        help="the joint stage's learning rate for the vision tower and projector, as a fraction of --lr",
    )
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
    p.add_argument(
        "--relation-weight",
        type=float,
        default=0.0,
        help="weight of the auxiliary loss that asks a linear head on the language model's residual stream at "
        "--relation-layer, at the last prompt position of a relative question, for --relation-target",
    )
    p.add_argument(
        "--relation-target",
        choices=batches.RELATION_TARGETS,
        default="cells",
        help="what the relation head predicts: 'cells' (the 3 x 3 cells of both objects), 'comparisons' (the "
        "four yes/no comparisons of their columns and rows: A left of B, right of, above, below) or 'asked' "
        "(which of the four relations the question asks)",
    )
    p.add_argument(
        "--relation-layer",
        type=int,
        default=None,
        help="the language model layer whose output the relation head reads (default: the middle layer, "
        "text_layers // 2 - 1)",
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
    p.add_argument(
        "--oversample",
        default=None,
        help="'TYPE:FRACTION': that fraction of each batch's images get a first question of TYPE (e.g. "
        "'relative:0.4'); the other images cycle through the question types as usual",
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
    if args.relation_layer is None:
        args.relation_layer = args.text_layers // 2 - 1
    if not 0 <= args.relation_layer < args.text_layers:
        p.error(f"--relation-layer {args.relation_layer}: the language model has layers 0..{args.text_layers - 1}")
    return args


class PatchHeads(torch.nn.Module):
    """Throwaway linear probes on the projector output, one on the language model's middle layer (image
    tokens) and one on ``--relation-layer`` (the last prompt position of a relative question); training
    only."""

    def __init__(self, width: int, source=data, target: bool = False, relation: str | None = None):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(source.COLOURS))
        self.shape = torch.nn.Linear(width, 1 + len(source.SHAPES))
        self.cell = torch.nn.Linear(width, source.CELLS * source.CELLS)
        self.target = torch.nn.Linear(width, 2) if target else None
        self.relation_shape = batches.relation_shape(relation, source) if relation else None
        self.relation = torch.nn.Linear(width, math.prod(self.relation_shape)) if relation else None

    def loss(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            F.cross_entropy(getattr(self, name)(tokens).flatten(0, 1), labels[name].flatten())
            for name in ("colour", "shape", "cell")
        )

    def vision_loss(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The vision-only stage's loss: colour (or background) and cell on every patch, shape on object
        patches only. Shape on every patch lets "background" dominate and the tower never learns shape."""
        on_object = labels["shape"] > 0
        return (
            F.cross_entropy(self.colour(tokens).flatten(0, 1), labels["colour"].flatten())
            + F.cross_entropy(self.cell(tokens).flatten(0, 1), labels["cell"].flatten())
            + F.cross_entropy(self.shape(tokens)[on_object], labels["shape"][on_object])
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


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def vision_stage(model, heads, processor, source, vision: list, captured: dict, args) -> None:
    """Train the tower and projector alone through the per-patch heads (constant ``--vision-lr``, gradient
    norm clipped to 1). Joint training from scratch on the scenes organism never carried object shape to
    the projector output (a probe read colour at 99.5 %, shape at 25 %); this stage teaches it first."""
    params = vision + list(heads.colour.parameters()) + list(heads.shape.parameters())
    params += list(heads.cell.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=args.weight_decay)
    held_out = batches.make_pool(processor, 200, args.seed, 1, start=10**6, source=source)
    bar = tqdm(range(args.vision_steps), desc="vision")
    for step in bar:
        batch = batches.make_pool(processor, args.batch, args.seed, 1, args.data_start + step * args.batch, source)
        model.model.get_image_features(pixel_values=batch["pixel_values"])
        loss = heads.vision_loss(captured["v"], batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            with torch.no_grad():
                model.model.get_image_features(pixel_values=held_out["pixel_values"])
                on_object = held_out["shape"] > 0
                guess = heads.shape(captured["v"])[on_object].argmax(-1)
                shape_acc = (guess == held_out["shape"][on_object]).float().mean().item()
            tqdm.write(f"vision step {step + 1}: held-out object-patch shape accuracy {shape_acc:.3f}")


def _capture_output(layer: torch.nn.Module, captured: dict, key: str) -> None:
    """Keep ``layer``'s output hidden states in ``captured[key]`` on every forward."""
    layer.register_forward_hook(lambda m, i, o: captured.__setitem__(key, o[0] if isinstance(o, tuple) else o))


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
    heads = PatchHeads(
        args.text_width,
        source,
        target=args.target_weight > 0,
        relation=args.relation_target if args.relation_weight > 0 else None,
    )
    n_params = sum(p.numel() for p in model.parameters())
    tqdm.write(f"model parameters: {n_params / 1e6:.2f} M")

    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
    vision = list(model.model.vision_tower.parameters()) + list(
        model.model.multi_modal_projector.parameters()
    )
    if args.vision_steps:
        vision_stage(model, heads, processor, source, vision, captured, args)

    pool = batches.make_pool(processor, args.pool, args.seed, args.turns, source=source) if args.pool else None
    params = list(model.parameters()) + list(heads.parameters())
    vision_ids = {id(p) for p in vision}
    groups = [
        {"params": [p for p in params if id(p) not in vision_ids], "scale": 1.0},
        {"params": vision, "scale": args.tower_lr_scale},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    layers = model.model.language_model.layers
    if heads.target is not None:
        _capture_output(layers[args.text_layers // 2 - 1], captured, "mid")
    if heads.relation is not None:
        _capture_output(layers[args.relation_layer], captured, "relation")
    val_items = list(data.ShapesDataset("test", args.seed + 1, args.eval_size, organism=args.organism))
    rng = np.random.default_rng(args.seed)

    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        model.train()
        if pool is None:
            batch = batches.make_pool(
                processor,
                args.batch,
                args.seed,
                args.turns,
                args.data_start + (args.vision_steps + step) * args.batch,
                source,
                max_objects_at(step, args),
                args.oversample,
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
        relation = batch[f"relation_{args.relation_target}"]
        if heads.relation is not None and bool((relation >= 0).any()):  # else every label is ignored: NaN loss
            rows = torch.arange(len(batch["prompt_end"]))
            guess = heads.relation(captured["relation"][rows, batch["prompt_end"]])
            relation_loss = F.cross_entropy(
                guess.unflatten(-1, heads.relation_shape).flatten(0, 1), relation.flatten(), ignore_index=-100
            )
            loss = loss + args.relation_weight * relation_loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args) * group["scale"]
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
