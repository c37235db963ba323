"""One rank's shards: the in-memory buffer of kept rows, and the shard files with their progress file.

A shard holds a contiguous range of this rank's items: one [rows, d] tensor per hook, the row table
``rows`` [rows, 6] (``ROW_FIELDS``) and, in its metadata, the items' indices, ids and row counts. It is
written under a temporary name, fsynced and renamed, and only then listed in ``progress.json``
(itself replaced atomically). A shard counts as complete only once listed: on resume, files that are
not listed (a half-written ``.tmp``, or a shard renamed just before a crash) are deleted and redone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlm_lens.activations.files import dtype_code, read_json, write_json, write_safetensors
from vlm_lens.activations.positions import ROW_FIELDS, Selection

log = logging.getLogger(__name__)
PROGRESS = "progress.json"


class ShardBuffer:
    """Kept rows of the batches since the last shard, as the per-batch parts (never concatenated)."""

    def __init__(self, hooks: Sequence[str]):
        self.parts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        self.tails: dict[str, list[int]] = {}
        self.rows: list[torch.Tensor] = []
        self.items: list[list[Any]] = []  # [index, id, n_rows]
        self.nbytes = 0

    def add(self, name: str, rows: torch.Tensor) -> None:
        tail = list(rows.shape[1:])
        if self.tails.setdefault(name, tail) != tail:
            raise ValueError(f"hook {name!r} gave rows of shape {tail} after {self.tails[name]}; its width must not change.")
        flat = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))  # -1 cannot size a batch that kept no row
        self.parts[name].append(flat)
        self.nbytes += flat.numel() * flat.element_size()

    def add_items(self, selection: Selection, ids: Sequence[Any]) -> None:
        self.rows.append(selection.info)
        self.nbytes += selection.info.numel() * selection.info.element_size()
        self.items.extend([index, item_id, n] for index, item_id, n in zip(selection.indices, ids, selection.counts))


class RankShards:
    """The shard folder of one rank: what is complete, and writing the next shard."""

    def __init__(self, folder: Path, rank: int, start: int):
        self.dir = Path(folder) / "shards" / f"rank{rank:05d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / PROGRESS
        self.entries: list[dict[str, Any]] = read_json(path)["shards"] if path.exists() else []
        listed = {e["file"] for e in self.entries} | {PROGRESS}
        for entry in self.entries:
            file = self.dir / entry["file"]
            if not file.exists() or file.stat().st_size != entry["bytes"]:
                raise ValueError(f"{file} is listed as complete in {path} but is missing or has another size; the "
                                 "folder was changed by hand. Delete the folder and extract again.")
        for stray in sorted(self.dir.iterdir()):
            if stray.name not in listed:
                log.info("removing %s: not a complete shard (left by an interrupted run)", stray)
                stray.unlink()
        self.next_item = self.entries[-1]["stop"] if self.entries else start

    def write(self, buffer: ShardBuffer) -> None:
        """Write the buffer as the next shard and list it as complete."""
        if not buffer.items:
            return
        name = f"shard-{len(self.entries):05d}.safetensors"
        tensors = {hook: (parts[0].dtype if parts else torch.float32,
                          (sum(len(p) for p in parts), parts[0].shape[1] if parts else 0), parts)
                   for hook, parts in buffer.parts.items()}
        n_rows = sum(len(r) for r in buffer.rows)
        tensors["rows"] = (torch.int64, (n_rows, len(ROW_FIELDS)), buffer.rows)
        meta = {"items": json.dumps(buffer.items), "tails": json.dumps(buffer.tails)}
        write_safetensors(self.dir / name, tensors, meta)
        stop = buffer.items[-1][0] + 1
        self.entries.append({
            "file": name, "start": buffer.items[0][0], "stop": stop, "items": len(buffer.items), "rows": n_rows,
            "bytes": (self.dir / name).stat().st_size, "tails": buffer.tails,
            "dtypes": {h: dtype_code(parts[0].dtype) for h, parts in buffer.parts.items() if parts},
        })
        write_json(self.dir / PROGRESS, {"shards": self.entries})
        self.next_item = stop
