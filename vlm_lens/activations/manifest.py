"""What a folder holds: the call's fingerprint (checked on resume) and the manifest written at the end.

Folder layout::

    arguments.json             fingerprint of the call (model config and weights, hooks, positions, ...)
    shards/rank00000/          the shards while extracting (removed at the end unless keep_shards=True)
    hooks/<hook>.safetensors   one [n_rows, d] tensor per hook, all ranks joined, in dataset order
    rows.safetensors           "rows" [n_rows, 6]: item, position, image, grid, grid_row, grid_col
    items.jsonl                per item: index, id, and its rows [start, stop)
    manifest.json              written last: model id and hashes, hooks with shapes, counts, shards
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm_lens.activations.files import (
    atomic_file,
    fsync_dir,
    join_safetensors,
    read_header,
    read_json,
    torch_dtype,
    write_json,
)
from vlm_lens.activations.positions import ROW_FIELDS
from vlm_lens.activations.shards import PROGRESS

FORMAT = "vlm_lens.activations/1"
ARGUMENTS, MANIFEST = "arguments.json", "manifest.json"
_RUN_ONLY = ("device", "n_devices", "n_params")  # config fields that do not change the values


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(model: Any) -> str:
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k not in _RUN_ONLY}
    return _sha({"lm": cfg, "vlm": dataclasses.asdict(model.vlm_cfg)})


def weights_hash(model: Any, head: int = 64) -> str:
    """A cheap fingerprint of the weights: name, shape and the first ``head`` values of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().reshape(-1)[:head].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_id(model: Any) -> str:
    for obj in (model.processor, model.tokenizer):
        name = getattr(obj, "name_or_path", None)
        if name:
            return str(name)
    return str(model.cfg.model_name)


def differences(there: dict[str, Any], here: dict[str, Any]) -> list[str]:
    return [f"{key}: {there.get(key)!r} in the folder, {here.get(key)!r} in this call"
            for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key)]


def check_arguments(folder: Path, arguments: dict[str, Any]) -> str | None:
    """Write ``arguments.json`` in a new folder; for an existing one, the error naming what differs."""
    path = folder / ARGUMENTS
    if not path.exists():
        if folder.exists() and any(p.name != ARGUMENTS for p in folder.iterdir()):
            return (f"{folder} is not empty and holds no {ARGUMENTS}: it is not an extraction folder. Pass an empty "
                    "or new folder as out=.")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, arguments)
        return None
    diff = differences(read_json(path), arguments)
    if diff:
        return (f"{folder} holds an extraction made with other arguments ({'; '.join(diff)}). Call again with the "
                "same arguments to resume it, or use another out= folder (or delete this one) to start over.")
    return None


def finish(folder: Path, world_size: int, hooks: Sequence[str], header: dict[str, Any], keep_shards: bool) -> None:
    """Join every rank's shards into one file per hook (and the row table and item list), in dataset
    order, then write the manifest (last: its presence marks the folder complete)."""
    entries, sources = [], []
    for rank in range(world_size):
        rank_dir = folder / "shards" / f"rank{rank:05d}"
        progress = rank_dir / PROGRESS
        for entry in read_json(progress)["shards"] if progress.exists() else []:
            entries.append({**entry, "rank": rank})
            sources.append(rank_dir / entry["file"])
    position = 0
    for entry in entries:
        if entry["start"] != position:
            raise ValueError(f"shards do not cover the dataset contiguously: rank {entry['rank']} {entry['file']} "
                             f"starts at item {entry['start']}, expected {position}.")
        position = entry["stop"]
    (folder / "hooks").mkdir(exist_ok=True)
    meta = {"format": FORMAT}
    shapes = {}
    for hook in hooks:
        tail = next((e["tails"][hook] for e in entries if hook in e["tails"]), [])
        dtype = next((e["dtypes"][hook] for e in entries if hook in e["dtypes"]), "F32")
        width = int(np.prod(tail, dtype=np.int64)) if tail else 0
        join_safetensors(folder / "hooks" / f"{hook}.safetensors", hook, sources, torch_dtype(dtype), [width], meta)
        shapes[hook] = {"shape": tail, "width": width, "dtype": dtype, "file": f"hooks/{hook}.safetensors"}
    n_rows = join_safetensors(folder / "rows.safetensors", "rows", sources, torch.int64, [len(ROW_FIELDS)],
                              {**meta, "columns": ",".join(ROW_FIELDS)})
    _write_items(folder / "items.jsonl", sources)
    fsync_dir(folder / "hooks")
    fsync_dir(folder)  # every joined file is durable before the manifest says the folder is complete
    write_json(folder / MANIFEST, {
        **header, "format": FORMAT, "hooks": shapes, "n_items": position, "n_rows": n_rows,
        "row_fields": list(ROW_FIELDS), "rows": "rows.safetensors", "items": "items.jsonl",
        "shards": [{k: e[k] for k in ("rank", "file", "start", "stop", "rows")} for e in entries],
    })
    if not keep_shards:
        shutil.rmtree(folder / "shards", ignore_errors=True)


def _write_items(path: Path, sources: Sequence[Path]) -> None:
    row = 0
    with atomic_file(path, sync_dir=False) as f:
        for src in sources:
            for index, item_id, n in json.loads(read_header(src)[0]["__metadata__"]["items"]):
                f.write((json.dumps({"index": index, "id": item_id, "rows": [row, row + n]}) + "\n").encode())
                row += n
