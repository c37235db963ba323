"""Shared pieces of the activations tests and of the script they run in other processes."""

from __future__ import annotations

import os
import signal
from functools import cache

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_v", "hook_image_embeds"]
SHARD_MB = 0.05  # three batches of 2 items (about 12 KB per item) per shard: 12 items make 2 shards
BATCH_SIZE = 2


@cache
def organism_items(size: int) -> tuple:
    from vlm_lens import organism

    data = organism.ShapesDataset(split="test", seed=0, size=size)
    return tuple(data[i] for i in range(size))


class KillingDataset:
    """The first ``size`` organism test items; asking for item ``kill_at`` SIGKILLs the process."""

    def __init__(self, size: int, kill_at: int | None = None):
        self.items, self.kill_at = organism_items(size), kill_at

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        if i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.items[i]


def extract_args(out, size: int = 12, kill_at: int | None = None) -> dict:
    """The one set of arguments the resume and torchrun tests use (a resumed call must repeat them).

    A run that kills itself reads no batch ahead (``prefetch=0``), so where it dies is known exactly;
    prefetch is not part of the arguments a resumed call must repeat.
    """
    return dict(dataset=KillingDataset(size, kill_at), hooks=HOOKS, positions="image", out=str(out),
                batch_size=BATCH_SIZE, shard_mb=SHARD_MB, progress=False, prefetch=0 if kill_at is not None else 2)


def no_hooks_left(model) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
