"""load(folder): memory-mapped tensors in dataset order, the row table, a torch Dataset, probes on it."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vlm_lens import activations
from vlm_lens.analysis import probing

from .common import organism_items

HOOK = "blocks.1.hook_resid_post"
N = 16


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "acts"
    return activations.extract(model, organism_items(N), hooks=[HOOK, "hook_image_embeds"], positions="image",
                               out=out, batch_size=8, shard_mb=0.05, progress=False)


def test_tensor_is_a_memory_map_of_plain_safetensors_files(store):
    assert len(store.manifest["shards"]) > 1
    x = store.tensor(HOOK)  # several shards: joined once into one file, then mapped
    joined = store.folder / "joined" / f"{HOOK}.safetensors"
    with open("/proc/self/maps") as f:
        assert str(joined) in f.read()
    assert x.shape == (N * 9, 128) and store.tensor(HOOK) is x
    assert torch.equal(load_file(joined)[HOOK], x)  # readable by safetensors itself
    shards = [load_file(store.folder / s["file"]) for s in store.manifest["shards"]]
    assert torch.equal(torch.cat([s[HOOK] for s in shards]), x)
    assert torch.equal(torch.cat(store.shard_tensors(HOOK)), x)
    assert torch.equal(torch.cat([s["rows"] for s in shards]), store.rows.table)


def test_rows_and_items_line_up(store):
    rows = store.rows
    assert len(rows) == len(store) == N * 9
    for it in store.items:
        start, stop = it["rows"]
        assert bool((rows.item[start:stop] == it["index"]).all()) and it["id"] == it["index"]
    assert rows[10] == activations.Row(item=1, position=int(rows.position[10]), image=0, grid=0, grid_row=0, grid_col=1)
    with pytest.raises(ValueError, match="no row field"):
        rows.column("cell")
    with pytest.raises(ValueError, match="was not extracted"):
        store.tensor("blocks.0.hook_resid_post")


def test_dataset_serves_rows_to_a_dataloader(store):
    data = store.dataset("hook_image_embeds")
    data = pickle.loads(pickle.dumps(data))  # what a DataLoader worker receives
    assert len(data) == len(store)
    x, row = next(iter(DataLoader(data, batch_size=9, shuffle=False)))
    assert torch.equal(x, store.tensor("hook_image_embeds")[:9])
    assert torch.equal(row.grid_row, torch.arange(3).repeat_interleave(3)) and bool((row.item == 0).all())


def test_probing_fits_on_the_store_and_on_grid_matches_rows(store):
    items = organism_items(N)
    foreground = np.stack([np.any([o.patch_mask for o in it.objects], axis=0) for it in items])
    rows = store.rows
    labels = torch.as_tensor(foreground[rows.item, rows.grid_row, rows.grid_col]).long()
    probe = probing.fit_logistic(store.tensor(HOOK), labels)
    assert float((probe.predict(store.tensor(HOOK)) == labels).float().mean()) > 0.9
    grid = store.on_grid(HOOK)
    assert grid.shape == (N, 3, 3, 128)
    assert torch.equal(grid[2, 1, 2], store.tensor(HOOK)[2 * 9 + 1 * 3 + 2])
    scores = probing.linear_probe_segmentation(grid[None], torch.as_tensor(foreground), n_train=N // 2)
    assert scores.shape == (1,)
