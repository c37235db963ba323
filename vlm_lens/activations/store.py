"""Reading an extraction folder back: memory-mapped [n_rows, d] tensors, the row table, a torch Dataset.

A hook's rows live in the shards. Where there is one shard, ``tensor(hook)`` maps it directly; where
there are several, the first ``tensor(hook)`` joins that hook's rows into ``joined/<hook>.safetensors``
(file-to-file copies, bounded memory, atomic) and maps that file from then on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.utils.data
from jaxtyping import Float, Int

from vlm_lens.activations.files import join_safetensors, memmap, read_json, torch_dtype
from vlm_lens.activations.manifest import FORMAT, MANIFEST


class Row(NamedTuple):
    """One kept row: dataset item, sequence position, and where it is an image token, the image (within the
    item), the grid (0 base, 1 the crop grid of any-resolution images) and the cell; -1 where none applies."""

    item: int
    position: int
    image: int
    grid: int
    grid_row: int
    grid_col: int


@dataclass(frozen=True)
class Rows:
    """The row table, one column per ``Row`` field, each [n_rows] (memory-mapped)."""

    table: Int[torch.Tensor, "n_rows 6"]

    def __len__(self) -> int:
        return self.table.shape[0]

    def __getitem__(self, i: int) -> Row:
        return Row(*(int(v) for v in self.table[i]))

    def column(self, name: str) -> Int[torch.Tensor, " n_rows"]:
        if name not in Row._fields:
            raise ValueError(f"no row field {name!r}; fields are {Row._fields}.")
        return self.table[:, Row._fields.index(name)]

    item = property(lambda self: self.column("item"))
    position = property(lambda self: self.column("position"))
    image = property(lambda self: self.column("image"))
    grid = property(lambda self: self.column("grid"))
    grid_row = property(lambda self: self.column("grid_row"))
    grid_col = property(lambda self: self.column("grid_col"))


class ActivationStore:
    """An extraction folder: ``hooks``, ``tensor(hook)`` [n_rows, d], ``rows``, ``items``, ``dataset(hook)``.

    Rows are in dataset order (items in order; within an item, in the order its positions were kept).

    Example:
        >>> from vlm_lens.activations import extract
        >>> _ = extract(model, items, hooks=["blocks.1.hook_resid_post"], out="acts", progress=False)
        >>> store = load("acts")
        >>> store.tensor("blocks.1.hook_resid_post").shape  # memory-mapped [n_rows, d_model]
        torch.Size([72, 128])
        >>> store.rows[0]
        Row(item=0, position=9, image=0, grid=0, grid_row=0, grid_col=0)
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.exists():
            hint = (" It holds an unfinished extraction: call extract again with the same arguments to finish it."
                    if (self.folder / "shards").exists() else "")
            raise ValueError(f"{self.folder} has no {MANIFEST}, so it is not a complete extraction folder.{hint}")
        self.manifest: dict[str, Any] = read_json(path)
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path} has format {self.manifest.get('format')!r}; this vlm_lens reads {FORMAT!r}.")
        self._tensors: dict[str, torch.Tensor] = {}

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each hook's per-row shape before flattening (e.g. (n_kv_heads, d_head) for ``attn.hook_k``)."""
        return {h: tuple(info["shape"]) for h, info in self.manifest["hooks"].items()}

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    def _check(self, hook: str) -> dict[str, Any]:
        if hook not in self.manifest["hooks"]:
            raise ValueError(f"hook {hook!r} was not extracted into {self.folder}; it holds {self.hooks}.")
        return self.manifest["hooks"][hook]

    def tensor(self, hook: str) -> Float[torch.Tensor, "n_rows d"]:
        """All kept rows of ``hook``, memory-mapped (pages are read on use; writes stay in this process)."""
        info = self._check(hook)
        if hook not in self._tensors:
            self._tensors[hook] = self._mapped(hook, torch_dtype(info["dtype"]), info["width"])
        return self._tensors[hook]

    @cached_property
    def rows(self) -> Rows:
        return Rows(self._mapped("rows", torch.int64, len(Row._fields)))

    def _mapped(self, name: str, dtype: torch.dtype, width: int) -> torch.Tensor:
        shards = [self.folder / s["file"] for s in self.manifest["shards"]]
        if len(shards) == 1:
            return memmap(shards[0], name)
        joined = self.folder / "joined" / f"{name}.safetensors"
        if not joined.exists():
            if not os.access(self.folder, os.W_OK):
                raise ValueError(f"{self.folder} is read-only, and reading {name!r} as one tensor joins its "
                                 f"{len(shards)} shards into {joined} once. Copy the folder somewhere writable, or "
                                 "read it through store.shard_tensors(hook).")
            joined.parent.mkdir(exist_ok=True)
            join_safetensors(joined, name, shards, dtype, [width], {"format": FORMAT})
        return memmap(joined, name)

    def shard_tensors(self, hook: str) -> list[torch.Tensor]:
        """``hook``'s rows shard by shard (memory-mapped, in dataset order), without joining them."""
        self._check(hook)
        return [memmap(self.folder / s["file"], hook) for s in self.manifest["shards"]]

    @cached_property
    def items(self) -> list[dict[str, Any]]:
        """Per item: ``index`` (in the dataset), ``id`` and ``rows`` [start, stop) into the tensors."""
        with open(self.folder / self.manifest["items"]) as f:
            return [json.loads(line) for line in f]

    def dataset(self, hook: str) -> ActivationDataset:
        """A ``torch.utils.data.Dataset`` of (activation [d], ``Row``), memory-mapped, opened lazily (so it
        pickles cheaply to DataLoader workers)."""
        self.tensor(hook), self.rows  # join here once, not in every worker
        return ActivationDataset(self.folder, hook)

    def on_grid(self, hook: str) -> Float[torch.Tensor, "n_images rows cols d"]:
        """The rows of base-grid image tokens laid out per image: [n_images, rows, cols, d] (read into memory).

        Images are numbered in row order (item, then image within the item); every image must have all
        cells of one grid shape kept (e.g. ``positions="image"``).
        """
        rows, x = self.rows, self.tensor(hook)
        on_grid = (rows.grid == 0).nonzero().flatten()
        if not len(on_grid):
            raise ValueError(f"{self.folder} keeps no base-grid image token; extract with positions='image'.")
        table = rows.table[on_grid]
        key = table[:, 0] * (int(table[:, 2].max()) + 1) + table[:, 2]  # (item, image) -> one number
        _, image_of = torch.unique_consecutive(key, return_inverse=True)
        n_images = int(image_of.max()) + 1
        shape = (int(table[:, 4].max()) + 1, int(table[:, 5].max()) + 1)
        if len(on_grid) != n_images * shape[0] * shape[1]:
            raise ValueError(f"{n_images} images do not each keep all cells of a {shape} grid ({len(on_grid)} grid rows "
                             "kept); on_grid needs every cell of every image, as positions='image' keeps.")
        grid = x.new_zeros((n_images, *shape, x.shape[1]))
        grid[image_of, table[:, 4], table[:, 5]] = x[on_grid]
        return grid

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.folder)!r}, items={self.manifest['n_items']}, rows={len(self)}, "
                f"hooks={self.hooks})")


class ActivationDataset(torch.utils.data.Dataset):
    """(activation [d], ``Row``) per kept row of one hook; ``default_collate`` batches both."""

    def __init__(self, folder: Path, hook: str):
        self.folder, self.hook = Path(folder), hook
        self._store: ActivationStore | None = None

    def _open(self) -> ActivationStore:
        if self._store is None:
            self._store = ActivationStore(self.folder)
        return self._store

    def __len__(self) -> int:
        return len(self._open())

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Row]:
        store = self._open()
        return store.tensor(self.hook)[i], store.rows[i]

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "hook": self.hook, "_store": None}


def load(folder: str | Path) -> ActivationStore:
    """Open a complete extraction folder (see ``extract``)."""
    return ActivationStore(folder)
