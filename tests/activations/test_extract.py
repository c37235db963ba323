"""extract keeps exactly the selected rows: equal to run_with_cache on the same batch, with the layout's cells."""

import pytest
import torch

from vlm_lens import activations

from .common import KillingDataset, no_hooks_left, organism_items

LM_HOOKS = ["hook_embed", "blocks.0.attn.hook_k", "blocks.3.hook_resid_post"]
IMAGE_HOOKS = ["hook_image_features", "hook_image_embeds", "projector.hook_hidden"]
N, BATCH = 6, 3


def object_positions(inputs, item):
    """The asked-about object's patches (a positions function: one-row view + the dataset item)."""
    return inputs.layout.mask_to_positions(0, torch.as_tensor(item.target_mask))


def reference_batches(model, hooks):
    """run_with_cache on the batches extract forms (right padding), caching only ``hooks``."""
    items = organism_items(N)
    for start in range(0, N, BATCH):
        batch = items[start:start + BATCH]
        inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch], padding_side="right")
        _, cache = model.run_with_cache(inputs, names_filter=hooks)
        yield start, inputs, cache


@pytest.mark.parametrize("positions", ["image", "text", "last", "all", object_positions])
def test_rows_equal_run_with_cache_at_the_same_positions(model, tmp_path, positions):
    hooks = LM_HOOKS + (IMAGE_HOOKS if positions in ("image", object_positions) else [])
    store = activations.extract(model, organism_items(N), hooks=hooks, positions=positions, out=tmp_path / "a",
                                batch_size=BATCH, progress=False)
    assert sorted(store.hooks) == sorted(hooks) and no_hooks_left(model)
    rows = store.rows
    for start, inputs, cache in reference_batches(model, hooks):
        keep = (rows.item >= start) & (rows.item < start + BATCH)
        b, pos = rows.item[keep] - start, rows.position[keep]
        lengths = inputs.attention_mask.sum(1)
        assert bool((pos < lengths[b]).all())
        expected = {"image": inputs.image_mask[b, pos].all(), "text": ~inputs.image_mask[b, pos].any(),
                    "last": torch.equal(pos, lengths - 1), "all": len(pos) == int(lengths.sum())}
        assert bool(expected.get(positions, True))
        for hook in hooks:
            act = cache[hook]
            if hook in IMAGE_HOOKS:  # one row per image token, in sequence order
                flat = act.reshape(-1, act.shape[-1])
                image_index = inputs.image_mask.flatten().cumsum(0).view(inputs.image_mask.shape) - 1
                want = flat[image_index[b, pos]]
            else:
                want = act[b, pos].flatten(1)
            assert torch.equal(store.tensor(hook)[keep], want), hook
        for item, p, image, grid, r, c in rows.table[keep].tolist():
            on_image = bool(inputs.image_mask[item - start, p])
            assert (image == 0 and grid == 0) if on_image else (image, grid, r, c) == (-1, -1, -1, -1)
            if on_image:
                assert int(inputs.layout.grid(item - start)[r, c]) == p
    assert [it["index"] for it in store.items] == list(range(N))
    assert store.items[-1]["rows"][1] == len(store) == store.tensor(hooks[0]).shape[0]


def test_object_positions_keep_the_target_cells(model, tmp_path):
    store = activations.extract(model, organism_items(N), hooks=["hook_image_embeds"], positions=object_positions,
                                out=tmp_path / "a", batch_size=BATCH, progress=False)
    for it in store.items:
        start, stop = it["rows"]
        mask = torch.zeros(3, 3, dtype=torch.bool)
        mask[store.rows.grid_row[start:stop], store.rows.grid_col[start:stop]] = True
        assert torch.equal(mask, torch.as_tensor(organism_items(N)[it["index"]].target_mask))


def test_dtype_shard_size_and_iterables_give_the_same_rows(model, tmp_path):
    kwargs = dict(hooks=LM_HOOKS[1:], positions="all", batch_size=BATCH, progress=False)
    one = activations.extract(model, organism_items(N), out=tmp_path / "one", **kwargs)
    many = activations.extract(model, iter(organism_items(N)), out=tmp_path / "many", shard_mb=0.001, **kwargs)
    assert len(many.manifest["shards"]) == N // BATCH and len(one.manifest["shards"]) == 1
    for hook in kwargs["hooks"]:
        assert torch.equal(one.tensor(hook), many.tensor(hook))
    assert torch.equal(one.rows.table, many.rows.table) and one.items == many.items
    half = activations.extract(model, organism_items(N), out=tmp_path / "bf16", dtype=torch.bfloat16, **kwargs)
    for hook in kwargs["hooks"]:
        assert half.tensor(hook).dtype == torch.bfloat16
        assert torch.equal(half.tensor(hook), one.tensor(hook).to(torch.bfloat16))


@pytest.mark.parametrize("prefetch", [0, 2])  # with prefetch the error comes from the reading thread
def test_item_without_its_image_is_an_error_and_is_not_written(model, tmp_path, prefetch):
    items = [dict(prompt=it.prompt, image=it.image, id=f"img-{i}") for i, it in enumerate(organism_items(5))]
    items[3]["image"] = None
    with pytest.raises(ValueError, match=r"item 3 \(id 'img-3'\) has 1 '<image>' placeholder.*0 image"):
        activations.extract(model, items, hooks=LM_HOOKS, out=tmp_path / "a", batch_size=1, shard_mb=1e-6,
                            prefetch=prefetch, progress=False)
    assert no_hooks_left(model) and not (tmp_path / "a" / "manifest.json").exists()
    written = sorted(p.name for p in (tmp_path / "a" / "shards" / "rank00000").iterdir())
    assert written == ["progress.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    with pytest.raises(ValueError, match="unfinished extraction"):
        activations.load(tmp_path / "a")


def test_bad_calls_raise_before_or_without_leaving_hooks(model, tmp_path):
    items = organism_items(4)
    cases = [
        (dict(hooks=["blocks.9.hook_resid_post"]), "not hook points of this model"),
        (dict(hooks=["blocks.0.attn.hook_pattern"]), "no fixed width"),
        (dict(hooks=["hook_image_embeds"], positions="all"), "image tokens only"),
        (dict(hooks=["hook_image_embeds"], positions=lambda inputs, item: [0]), "include text tokens"),
        (dict(hooks=["vision.blocks.0.hook_resid_post"]), r"shape \(2, 10, 64\).*one row per image token"),
        (dict(hooks=["blocks.0.hook_attn_in"]), "did not fire"),
        (dict(hooks=LM_HOOKS, positions="middle"), "not one of"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            activations.extract(model, items, out=tmp_path / str(i), batch_size=2, progress=False, **kwargs)
        assert no_hooks_left(model)


def test_other_arguments_into_a_folder_name_what_differs(model, tmp_path):
    kwargs = dict(hooks=LM_HOOKS, out=tmp_path / "a", progress=False)
    activations.extract(model, organism_items(4), batch_size=2, **kwargs)
    with pytest.raises(ValueError, match="batch_size: 2 in the folder, 4 in this call"):
        activations.extract(model, organism_items(4), batch_size=4, **kwargs)
    with pytest.raises(ValueError, match=r"dataset: .*'length': 4.*'length': 3"):
        activations.extract(model, KillingDataset(3), batch_size=2, **kwargs)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an extraction folder"):
        activations.extract(model, organism_items(4), batch_size=2, **{**kwargs, "out": tmp_path / "other"})


def test_a_positions_function_may_run_the_model_without_being_captured(model, tmp_path):
    def last_after_a_forward(inputs, item):
        model("USER: what colour ?")  # the capture hooks are attached, but only capture extract's own passes
        return [inputs.tokens.shape[1] - 1]

    kwargs = dict(hooks=LM_HOOKS, batch_size=BATCH, progress=False)
    own = activations.extract(model, organism_items(N), positions=last_after_a_forward, out=tmp_path / "f", **kwargs)
    last = activations.extract(model, organism_items(N), positions="last", out=tmp_path / "l", **kwargs)
    for hook in LM_HOOKS:
        assert torch.equal(own.tensor(hook), last.tensor(hook))
    assert torch.equal(own.rows.table, last.rows.table) and no_hooks_left(model)


def test_hooks_attached_before_stay_and_run(model, tmp_path):
    kwargs = dict(hooks=["blocks.1.hook_resid_post"], batch_size=BATCH, progress=False)
    clean = activations.extract(model, organism_items(N), out=tmp_path / "clean", **kwargs)
    model.add_hook("blocks.0.hook_resid_post", lambda act, hook: act * 0)
    try:
        ablated = activations.extract(model, organism_items(N), out=tmp_path / "ablated", **kwargs)
        assert len(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks) == 1
    finally:
        model.reset_hooks()
    assert not torch.equal(clean.tensor(kwargs["hooks"][0]), ablated.tensor(kwargs["hooks"][0]))
