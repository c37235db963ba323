"""``extract``: run a dataset through the model and keep chosen rows of chosen hooks on disk.

Memory holds the model, the batches in flight and the rows kept since the last shard (``shard_mb``),
whatever the dataset's size or the sequence length; nothing else is cached. See
``vlm_lens.activations`` for the folder's layout, resuming and torchrun.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_lens.activations.batches import prepared_batches
from vlm_lens.activations.capture import RowCapture, check_hooks, stop_layer
from vlm_lens.activations.dataset import DatasetReader, Item, check_placeholders
from vlm_lens.activations.distributed import Group, batch_block, join_group
from vlm_lens.activations.files import dtype_code
from vlm_lens.activations.manifest import (
    ARGUMENTS,
    MANIFEST,
    check_arguments,
    config_hash,
    finish,
    model_id,
    weights_hash,
)
from vlm_lens.activations.positions import PositionsFn, describe, select
from vlm_lens.activations.shards import RankShards, ShardBuffer
from vlm_lens.activations.store import ActivationStore, load
from vlm_lens.hook_names import is_sequence_hook
from vlm_lens.inputs import VLMInputs


@dataclass(frozen=True)
class _Plan:
    """What every batch of one call needs."""

    hooks: list[str]
    positions: str | PositionsFn
    batch_size: int
    dtype: torch.dtype | None
    shard_bytes: float
    prefetch: int
    stop_at: int | None  # the forward stops after the deepest block a hook sits in


def extract(model: Any, dataset: Any, *, hooks: Sequence[str], positions: str | PositionsFn = "image",
            out: str | Path, batch_size: int = 16, dtype: torch.dtype | None = None, shard_mb: float | int = 16,
            prefetch: int = 0, progress: bool = True) -> ActivationStore:
    """Keep the rows ``positions`` selects of every hook in ``hooks``, for every item of ``dataset``, in ``out``.

    ``dataset``: a sequence or iterable of items with ``prompt`` and ``image`` (or ``images``), as
    attributes or keys (an ``organism.ShapesDataset`` is one); an optional ``id``. ``positions``:
    ``"image"``, ``"text"``, ``"last"``, ``"all"`` or ``fn(inputs, item) -> positions`` (see
    ``vlm_lens.activations.positions``). ``dtype``: stored dtype (None: the hook's own). A shard is
    written each time the kept rows reach ``shard_mb`` MiB. ``prefetch`` > 0 reads and prepares that
    many batches ahead in a background thread (off by default: on a busy CPU it cost more than it saved). Killed at any point, a second call with the same
    arguments resumes after the last complete shard and ends with the same bytes; other arguments
    into the same folder are an error naming what differs. Under ``torchrun`` each rank extracts its
    block of batches and rank 0 lists them in the manifest.
    Hooks already attached to the model (e.g. an intervention added with ``model.add_hook``) run too;
    they are not part of the arguments checked on resume.

    Returns the store (``load(out)``) on every rank.

    Example:
        >>> store = extract(model, organism.ShapesDataset("test", seed=0, size=8),
        ...                 hooks=["blocks.1.hook_resid_post"], positions="image", out="acts", progress=False)
        >>> store.tensor("blocks.1.hook_resid_post").shape  # [n_rows, d_model]
        torch.Size([72, 128])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be > 0, got {shard_mb}.")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or None (keep each hook's own), got {dtype!r}.")
    if dtype is not None:
        dtype_code(dtype)  # one that cannot be stored is refused before anything runs
    hooks = check_hooks(model, hooks)
    spec = describe(positions)
    image_hooks = [h for h in hooks if not is_sequence_hook(h)]
    if image_hooks and spec in ("text", "last", "all"):
        raise ValueError(f"hooks {image_hooks} have rows for image tokens only, so positions={spec!r} cannot be read "
                         "there. Use positions='image', or extract them in a separate call.")
    plan = _Plan(hooks, positions, batch_size, dtype, float(shard_mb) * 2**20, prefetch, stop_layer(model, hooks))
    out = Path(out)
    reader = DatasetReader(dataset)
    group = join_group(model.cfg.device)
    try:
        if group.active and reader.length is None:
            raise ValueError("under torchrun the dataset needs a length (to split it by rank); pass a sequence.")
        arguments = {"config_hash": config_hash(model), "weights_hash": weights_hash(model), "hooks": hooks,
                     "positions": spec, "batch_size": batch_size, "dtype": str(dtype) if dtype else "as produced",
                     "shard_mb": shard_mb, "dataset": reader.identity(), "world_size": group.world_size}
        _on_all_ranks(group, lambda: _check_folder(out, arguments) if group.rank == 0 else None)
        if not (out / MANIFEST).exists():
            _on_all_ranks(group, lambda: _run_rank(model, reader, plan, out, group, progress))
            header = {"model": {"id": model_id(model), "config_hash": arguments["config_hash"],
                                "weights_hash": arguments["weights_hash"]}, "arguments": ARGUMENTS}
            _on_all_ranks(group, lambda: finish(out, group.world_size, hooks, header)
                          if group.rank == 0 else None)
    finally:
        group.close()
    return load(out)


def _check_folder(out: Path, arguments: dict[str, Any]) -> None:
    error = check_arguments(out, arguments)
    if error:
        raise ValueError(error)


def _on_all_ranks(group: Group, step: Callable[[], None]) -> None:
    """Run ``step`` on this rank, then wait for every rank; if any rank failed, raise on every rank (so no
    rank waits forever for one that has gone)."""
    if not group.active:
        step()
        return
    try:
        step()
        error = None
    except Exception as err:  # reported to every rank, then raised here too
        error = f"rank {group.rank}: {type(err).__name__}: {err}"
    errors = [e for e in group.gather(error) if e]
    if errors:
        raise ValueError(f"extraction failed on {len(errors)} rank(s); {errors[0]}")


def _run_rank(model: Any, reader: DatasetReader, plan: _Plan, out: Path, group: Group, progress: bool) -> None:
    """Extract this rank's block of items into its shards, after the last complete one."""
    start, stop = (0, None) if reader.length is None else batch_block(reader.length, plan.batch_size, group.rank,
                                                                       group.world_size)
    shards = RankShards(out, group.rank, start)
    bar = tqdm(total=None if stop is None else stop - start, initial=shards.next_item - start, unit="item",
               desc="extract", dynamic_ncols=True, disable=not progress or group.rank != 0)
    placeholder = model.processor.image_token

    def prepare(batch: list[Item]) -> VLMInputs:
        check_placeholders(batch, placeholder)
        # right padding: every item's tokens start at position 0, so positions are the item's own
        return model.prepare([it.prompt for it in batch], images=[it.images for it in batch], padding_side="right")

    capture = RowCapture(plan.hooks, plan.dtype)
    buffer = ShardBuffer(plan.hooks)
    # the capture hooks are attached once for the call and removed on the way out, error or not
    with bar, torch.no_grad(), model.hooks(fwd_hooks=capture.fwd_hooks()):
        for batch, inputs in prepared_batches(reader.items(shards.next_item, stop), plan.batch_size, prepare,
                                              plan.prefetch):
            selection = select(plan.positions, inputs, [it.raw for it in batch], [it.index for it in batch])
            with capture.batch(selection, inputs.image_mask.cpu(), buffer, [s.n_embeds for s in inputs.layout.spans]):
                # return_type=None: no unembedding (a pass stopped early returns its residual anyway)
                model(inputs.to(model.cfg.device), stop_at_layer=plan.stop_at, return_type=None)
            buffer.add_items(selection, [it.id for it in batch])
            bar.update(len(batch))
            if buffer.nbytes >= plan.shard_bytes:
                shards.write(buffer)
                buffer = ShardBuffer(plan.hooks)
        shards.write(buffer)
