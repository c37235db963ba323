"""Activations at dataset scale: chosen rows of chosen hooks, extracted to disk in bounded memory.

>>> from vlm_lens import activations, organism
>>> store = activations.extract(model, organism.ShapesDataset("test", seed=0, size=8),
...                             hooks=["blocks.2.hook_resid_post"], positions="image", out="acts", progress=False)
>>> store = activations.load("acts")
>>> x, rows = store.tensor("blocks.2.hook_resid_post"), store.rows
>>> x.shape, len(rows)  # 8 images x 3x3 patches, d_model
(torch.Size([72, 128]), 72)

- ``extract``: keeps only the selected rows inside each hook (no cache), writes shards atomically,
  resumes after a crash with the same bytes, and splits the batches by rank under ``torchrun``.
- ``load`` -> ``ActivationStore``: ``hooks``, ``shapes``, ``tensor(hook)`` ([n_rows, d], memory-mapped,
  dataset order), ``rows`` (item, position, image, grid, grid_row, grid_col per row), ``items``,
  ``dataset(hook)`` (a torch ``Dataset`` of (activation, ``Row``)), ``on_grid(hook)``, ``shard_tensors(hook)``.
"""

from vlm_lens.activations.extract import extract
from vlm_lens.activations.store import ActivationDataset, ActivationStore, Row, Rows, load

__all__ = ["ActivationDataset", "ActivationStore", "Row", "Rows", "extract", "load"]
