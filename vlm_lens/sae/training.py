"""Training SAEs on a VLM's activations at image tokens, with SAE Lens's trainer.

SAE Lens's ``SAETrainer`` takes any iterator of activation batches as its data source, so the only
VLM-specific part is that source: ``activation_batches`` runs the model over (image, prompt) items, keeps
the activation rows at the chosen positions of one hook (image tokens by default, read from each batch's
``VLMInputs``), and mixes them in a shuffle buffer. ``train_sae`` wires it to an SAE Lens training SAE
and returns the inference ``SAE``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import Any, Literal

import torch
from jaxtyping import Float
from sae_lens import (
    SAE,
    LoggingConfig,
    SAETrainer,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig

from vlm_lens import VLMInputs
from vlm_lens.sae._names import is_sequence_hook
from vlm_lens.sae.features import activation

RowPositions = Literal["image", "text", "all"]


def _selected_rows(acts: torch.Tensor, inputs: VLMInputs, hook_name: str, positions: RowPositions) -> torch.Tensor:
    if not is_sequence_hook(hook_name):
        # a vision-side hook: [total_tokens, d] or [n_images, n_tokens, ...], every token belongs to an image
        if positions == "text":
            raise ValueError("positions='text' needs a language-model hook; vision-side hooks hold only image tokens.")
        if acts.ndim == 2:
            return acts
        sizes = {span.n_embeds for span in inputs.layout.spans}
        if len(sizes) > 1 and acts.shape[0] == len(inputs.layout.spans):
            # a tower that takes each image at its own size stacks them padded to the largest: those rows
            # are no image's tokens, and which they are is the tower's business
            raise ValueError(f"{hook_name} stacks images of different sizes ({sorted(sizes)} tokens each) padded to "
                             "the largest, so some of its rows are padding. Use batch_size=1 (one image per "
                             "forward pass) or images of one size.")
        return acts.flatten(0, 1).reshape(acts.shape[0] * acts.shape[1], -1)
    real = inputs.attention_mask.bool().to(acts.device)
    image = inputs.image_mask.to(acts.device)
    keep = {"image": image, "text": real & ~image, "all": real}[positions]
    return acts[keep].reshape(int(keep.sum()), -1)


def activation_rows(model: Any, items: Iterable[Any], hook_name: str, *, positions: RowPositions = "image",
                    batch_size: int = 32) -> Iterator[Float[torch.Tensor, "n d_in"]]:
    """Activations at ``hook_name`` for each batch of ``items`` (objects with ``.prompt`` and ``.image``,
    e.g. ``organism.ShapesDataset``), one [n, d_in] tensor per batch, only at ``positions``: the image
    tokens (default), the other real tokens (``"text"``), or every real token (``"all"``). Hook-z style
    activations are flattened over heads. Vision-side hooks give every token of every image.

    Example:
        >>> rows = next(activation_rows(model, organism.ShapesDataset("train", size=8), "blocks.1.hook_resid_post"))
        >>> rows.shape  # 8 images x 3x3 patches, d_model
        torch.Size([72, 128])
    """
    if positions not in ("image", "text", "all"):
        raise ValueError(f"positions={positions!r}; use 'image', 'text' or 'all'.")
    if hook_name not in model.hook_dict:
        raise ValueError(f"{hook_name!r} is not a hook point of this model (is an SAE attached there?); "
                         "see model.hook_dict for the names.")
    iterator = iter(items)
    while batch := list(islice(iterator, batch_size)):
        inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
        yield _selected_rows(activation(model, inputs, hook_name), inputs, hook_name, positions).float().cpu()


def activation_batches(model: Any, items: Sequence[Any], hook_name: str, *, batch_size: int = 1024,
                       positions: RowPositions = "image", forward_batch_size: int = 32, buffer_batches: int = 16,
                       seed: int = 0, repeat: bool = True) -> Iterator[Float[torch.Tensor, "batch d_in"]]:
    """Shuffled [batch_size, d_in] batches of ``activation_rows``: the data source SAE Lens's ``SAETrainer``
    takes. Rows are mixed in a buffer of ``buffer_batches`` batches (half of it is handed out each time it
    fills, as SAE Lens's own mixing buffer does); with ``repeat`` the items are run again when they run out.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.zeros(0)
    while True:
        for rows in activation_rows(model, items, hook_name, positions=positions, batch_size=forward_batch_size):
            pool = rows if pool.numel() == 0 else torch.cat([pool, rows])
            if len(pool) >= buffer_batches * batch_size:
                pool = pool[torch.randperm(len(pool), generator=generator)]
                n_out = (len(pool) // 2) // batch_size * batch_size
                yield from pool[:n_out].split(batch_size)
                pool = pool[n_out:]
        if not repeat:
            break
    pool = pool[torch.randperm(len(pool), generator=generator)]
    yield from (b for b in pool.split(batch_size) if len(b) == batch_size)


def train_sae(model: Any, items: Sequence[Any], hook_name: str, *, d_sae: int, k: int | None = 8,
              l1_coefficient: float | None = None, training_samples: int = 200_000, batch_size: int = 1024,
              lr: float = 1e-3, positions: RowPositions = "image", seed: int = 0, forward_batch_size: int = 32,
              normalize_activations: Literal["none", "expected_average_only_in"] = "expected_average_only_in",
              out: str | None = None) -> SAE[Any]:
    """Train an SAE at ``hook_name`` on the activations of ``items`` at ``positions`` (image tokens by
    default) with SAE Lens's ``SAETrainer``; returns the inference ``SAE`` (saved in SAE Lens's format
    to ``out`` when given).

    A TopK SAE with ``k`` active features (default), or with ``k=None`` and ``l1_coefficient`` a standard
    ReLU SAE with an L1 penalty. Adam at ``lr``, constant after a short warm-up, for
    ``training_samples`` activation rows. With ``normalize_activations="expected_average_only_in"``
    (default) SAE Lens scales the inputs to an average norm of sqrt(d_in) during training (estimated on 20
    batches) and folds the scale into the weights at the end, so the SAE takes raw activations.

    Example:
        >>> sae = train_sae(model, list(organism.ShapesDataset("train", size=8)), "blocks.1.hook_resid_post",
        ...                 d_sae=32, training_samples=512, batch_size=64, out="my_sae")
        >>> sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.metadata.hook_name
        (128, 32, 'blocks.1.hook_resid_post')
    """
    if (k is None) == (l1_coefficient is None):
        raise ValueError(f"give exactly one of k (TopK SAE) and l1_coefficient (ReLU SAE with L1); got k={k}, "
                         f"l1_coefficient={l1_coefficient}.")
    torch.manual_seed(seed)
    batches = activation_batches(model, items, hook_name, batch_size=batch_size, positions=positions,
                                 forward_batch_size=forward_batch_size, seed=seed)
    first = next(batches)
    d_in = first.shape[1]
    common = dict(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", normalize_activations=normalize_activations)
    if k is not None:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient, **common))
    sae.cfg.metadata.hook_name = hook_name
    sae.cfg.metadata.model_name = getattr(model.cfg, "model_name", None)
    steps = training_samples // batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=training_samples, train_batch_size_samples=batch_size, lr=lr,
        lr_warm_up_steps=min(100, steps // 10), lr_end=lr, device="cpu", dead_feature_window=max(1, steps // 4),
        feature_sampling_window=max(1, steps), n_batches_for_norm_estimate=20,
        logger=LoggingConfig(log_to_wandb=False),
    )
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_chain(first, batches)).fit()
    if out is not None:
        sae.save_inference_model(out)
        return SAE.load_from_disk(out)
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp)


def _chain(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest
