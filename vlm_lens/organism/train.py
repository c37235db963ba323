"""Train the shapes organism from scratch on CPU and save it in Hugging Face format.

    python -m vlm_lens.organism.train --out vlm_lens/organism/weights

The loss is cross-entropy on the one-token answer at the last prompt position, plus an auxiliary
per-patch loss: throwaway linear heads on the projector output predict each patch's object colour,
object shape (or background) and grid cell. The heads are not saved; they keep object information
local to the object's patches, which is what the ablation check in ``sanity.py`` relies on.
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the vlm_lens shapes organism")
    p.add_argument("--out", required=True, help="folder for config, safetensors, tokenizer, processor")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-weight", type=float, default=1.0)
    p.add_argument("--curriculum", type=float, default=0.0, help="fraction of steps on one-object images")
    p.add_argument("--pool", type=int, default=40000, help="training items generated up front")
    p.add_argument("--vision-width", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    p.add_argument("--text-width", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-size", type=int, default=500)
    return p.parse_args(argv)


class PatchHeads(torch.nn.Module):
    """Throwaway linear probes on the projector output (training only)."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = torch.nn.Linear(width, 1 + len(data.COLOURS))
        self.shape = torch.nn.Linear(width, 1 + len(data.SHAPES))
        self.cell = torch.nn.Linear(width, data.CELLS * data.CELLS)

    def loss(self, tokens: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(
            F.cross_entropy(getattr(self, name)(tokens).flatten(0, 1), labels[name].flatten())
            for name in ("colour", "shape", "cell")
        )


def make_pool(processor, size: int, seed: int) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    items = list(tqdm(data.ShapesDataset(split="train", seed=seed, size=size), desc="data", leave=False))
    pool = build.encode_fast(processor, items)
    pool.update(build.patch_labels(items))
    return pool, np.array([len(it.objects) for it in items])


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(args) -> tuple[LlavaForConditionalGeneration, object]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    processor = build.build_processor()
    config = build.build_config(args.vision_width, args.vision_layers, args.text_width, args.text_layers)
    model = LlavaForConditionalGeneration(config)
    heads = PatchHeads(args.text_width)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params / 1e6:.2f} M")

    pool, n_objects = make_pool(processor, args.pool, args.seed)
    single = np.flatnonzero(n_objects == 1)
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    captured = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("v", o))
    val_items = list(data.ShapesDataset(split="test", seed=args.seed + 1, size=args.eval_size))
    rng = np.random.default_rng(args.seed)

    bar = tqdm(range(args.steps), desc="train")
    for step in bar:
        model.train()
        source = single if step < args.curriculum * args.steps else None
        idx = torch.from_numpy(rng.choice(source, args.batch) if source is not None
                               else rng.integers(0, args.pool, args.batch))
        length = int(pool["last"][idx].max()) + 1
        logits = model(
            input_ids=pool["input_ids"][idx, :length],
            attention_mask=pool["attention_mask"][idx, :length],
            pixel_values=pool["pixel_values"][idx],
        ).logits
        answer_logits = logits[torch.arange(args.batch), pool["last"][idx]]
        answer_loss = F.cross_entropy(answer_logits, pool["answer"][idx])
        aux_loss = heads.loss(captured["v"], {k: pool[k][idx] for k in ("colour", "shape", "cell")})
        loss = answer_loss + args.aux_weight * aux_loss
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0:
            acc = (answer_logits.argmax(-1) == pool["answer"][idx]).float().mean().item()
            bar.set_postfix(loss=f"{answer_loss.item():.3f}", aux=f"{aux_loss.item():.3f}", acc=f"{acc:.2f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val = sanity.accuracy_by_type(val_items, sanity.predictions(model, processor, val_items))
            tqdm.write(f"step {step + 1}: validation " + " ".join(f"{k}={v:.3f}" for k, v in val.items()))
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
    results = sanity.evaluate(model, processor, size=500, seed=0)
    results["train_seconds"] = round(train_seconds, 1)
    results["args"] = vars(args)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    results["folder_mb"] = round(size_mb, 2)
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
