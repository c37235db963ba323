"""Several processes (``torchrun``): this process's rank, its share of the batches, and collectives.

``extract`` uses an initialised ``torch.distributed`` process group, or initialises one itself when
``torchrun`` set ``WORLD_SIZE`` > 1 (``nccl`` for a model on CUDA, ``gloo`` otherwise) and tears it
down afterwards. Batches are split in contiguous blocks, so every batch holds the same items as in a
one-process run and the union of the ranks' rows is that run's rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Group:
    rank: int
    world_size: int
    owned: bool  # extract initialised the process group and destroys it at the end

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), on every rank."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def join_group(device: torch.device | str) -> Group:
    """The current process group, or one started from torchrun's environment variables, or none."""
    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), owned=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(0, 1, owned=False)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ValueError(f"WORLD_SIZE={world} is set but RANK or MASTER_ADDR is not; launch with torchrun, or "
                         "initialise torch.distributed yourself before calling extract.")
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device).index or int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return Group(dist.get_rank(), dist.get_world_size(), owned=True)


def batch_block(n_items: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Items [start, stop) of ``rank``: a contiguous block of whole batches (the last rank may get fewer)."""
    n_batches = -(-n_items // batch_size)
    first, last = rank * n_batches // world_size, (rank + 1) * n_batches // world_size
    return min(first * batch_size, n_items), min(last * batch_size, n_items)
