"""What a folder holds: the call's fingerprint (checked on resume) and the manifest written at the end.

Folder layout::

    arguments.json               fingerprint of the call (model config and weights, hooks, positions, ...)
    shards/rank00000/shard-00000.safetensors
                                 per hook a [rows, d] tensor, and "rows" [rows, 6] (item, position, image,
                                 grid, grid_row, grid_col); items' indices, ids and row counts in its metadata
    shards/rank00000/progress.json   the rank's complete shards (a shard not listed is not complete)
    items.jsonl                  per item: index, id, and its rows [start, stop) in dataset order
    manifest.json                written last: model id and hashes, hooks with shapes, counts, the shards
                                 in dataset order with their first row
    joined/<hook>.safetensors    written on first read by ``store.tensor(hook)`` where there are several
                                 shards: the hook's rows of all shards in one file, to memory-map
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlm_lens.activations.files import (
    atomic_file,
    read_header,
    read_json,
    write_json,
)
from vlm_lens.activations.positions import ROW_FIELDS
from vlm_lens.activations.shards import PROGRESS

logger = logging.getLogger(__name__)

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
    if diff and not _has_shards(folder):  # a call that failed before its first shard: nothing to resume
        logger.info("%s holds no shard yet; its arguments are replaced (%s).", folder, "; ".join(diff))
        write_json(path, arguments)
        return None
    if diff:
        return (f"{folder} holds an extraction made with other arguments ({'; '.join(diff)}). Call again with the "
                "same arguments to resume it, or use another out= folder (or delete this one) to start over.")
    return None


def _has_shards(folder: Path) -> bool:
    """Whether any rank of the extraction in ``folder`` has written a shard."""
    return any(read_json(progress)["shards"] for progress in folder.glob(f"shards/rank*/{PROGRESS}"))


def finish(folder: Path, world_size: int, hooks: Sequence[str], header: dict[str, Any]) -> None:
    """List every rank's shards in dataset order, write the item list, then the manifest (last: its presence
    marks the folder complete). No activation is copied: the shards are the output."""
    entries = []
    for rank in range(world_size):
        progress = folder / "shards" / f"rank{rank:05d}" / PROGRESS
        entries += [{**e, "rank": rank} for e in (read_json(progress)["shards"] if progress.exists() else [])]
    position = row = 0
    shards = []
    for entry in entries:
        if entry["start"] != position:
            raise ValueError(f"shards do not cover the dataset contiguously: rank {entry['rank']} {entry['file']} "
                             f"starts at item {entry['start']}, expected {position}.")
        shards.append({"file": f"shards/rank{entry['rank']:05d}/{entry['file']}", "rank": entry["rank"],
                       "start": entry["start"], "stop": entry["stop"], "rows": entry["rows"], "first_row": row})
        position, row = entry["stop"], row + entry["rows"]
    shapes = {}
    for hook in hooks:
        tail = next((e["tails"][hook] for e in entries if hook in e["tails"]), [])
        shapes[hook] = {"shape": tail, "width": int(np.prod(tail, dtype=np.int64)) if tail else 0,
                        "dtype": next((e["dtypes"][hook] for e in entries if hook in e["dtypes"]), "F32")}
    _write_items(folder / "items.jsonl", [folder / s["file"] for s in shards])
    write_json(folder / MANIFEST, {
        **header, "format": FORMAT, "hooks": shapes, "n_items": position, "n_rows": row,
        "row_fields": list(ROW_FIELDS), "items": "items.jsonl", "shards": shards,
    })


def _write_items(path: Path, sources: Sequence[Path]) -> None:
    row = 0
    with atomic_file(path, sync_dir=False) as f:
        for src in sources:
            for index, item_id, n in json.loads(read_header(src)[0]["__metadata__"]["items"]):
                f.write((json.dumps({"index": index, "id": item_id, "rows": [row, row + n]}) + "\n").encode())
                row += n
