"""organism.studies: the mechanics on an untrained model of the scenes architecture, and the robust findings
of the seed studies on the trained scenes organism (when its weights are in the package)."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import HookedVLM, analysis, organism
from vlm_lens.organism import drawing, studies

WEIGHTS = organism.path("scenes") / "model.safetensors"
trained_only = pytest.mark.skipif(
    not WEIGHTS.exists(),
    reason=f"the scenes organism is not trained yet ({WEIGHTS} is missing; "
    "`python -m vlm_lens.organism.train --organism scenes` writes it)",
)


def save_untrained_scenes(folder):
    """A seeded, untrained model of the scenes organism's architecture: every code path, none of the skill."""
    from transformers import LlavaForConditionalGeneration

    from vlm_lens.organism import build, scenes, train

    sizes = train.DEFAULTS["scenes"]
    torch.manual_seed(0)
    config = build.build_config(
        sizes["vision_width"], sizes["vision_layers"], 128, sizes["text_layers"], sizes["text_mlp"], scenes
    )
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    build.build_processor(scenes).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    return HookedVLM.from_pretrained(str(save_untrained_scenes(tmp_path_factory.mktemp("scenes_untrained"))))


@pytest.fixture(scope="module")
def items():
    return organism.ShapesDataset(split="test", seed=3, size=14, organism="scenes")[:]


def _grid_cells(inputs, b, positions):
    """(row, col) cells of image ``b``'s grid at the given sequence positions."""
    grid = inputs.layout.grid(b)
    return {tuple(int(v) for v in (grid == p).nonzero()[0]) for p in positions.tolist()}


def test_selections_object_buffers_and_random(untrained, items):
    chosen = studies.targeted(items)
    assert 0 < len(chosen) < len(items)  # "exists"-"no" items need no object
    inputs = studies._prepare(untrained, chosen)
    previous = None
    for buffer in (0, 1, 2):
        objects = studies.object_selection(inputs, chosen, buffer)
        for b, it in enumerate(chosen):
            cells = _grid_cells(inputs, b, objects[b])
            target = [tuple(c) for c in np.argwhere(it.target_mask)]
            near = {
                (r, c)
                for r in range(8)
                for c in range(8)
                if any(max(abs(r - i), abs(c - j)) <= buffer for i, j in target)
            }
            assert cells == near  # buffer 0: exactly the target's patches
            if previous is not None:
                assert set(previous[b].tolist()) < set(objects[b].tolist())  # each buffer grows the set
            one = untrained.prepare(it.prompt, images=[it.image])
            if 2 * len(near) > 64:  # no room for as many random cells outside the region
                with pytest.raises(ValueError, match="cells are allowed"):
                    studies.random_selection(one, [it], buffer)
                continue
            random = _grid_cells(one, 0, studies.random_selection(one, [it], buffer, seed=5)[0])
            assert len(random) == len(near) and not random & near
        previous = objects


def test_object_ablation_replaces_exactly_the_selected_tokens(untrained, items):
    chosen = studies.targeted(items)[:4]
    inputs = studies._prepare(untrained, chosen)
    mean = studies.mean_token(untrained, items[-4:])
    seen = {}
    hooks = studies.ablate(studies.object_selection, 1, mean)(inputs, chosen)
    hooks.append(("hook_image_embeds", lambda value, hook: seen.setdefault("embeds", value)))
    untrained.run_with_hooks(inputs, fwd_hooks=hooks)
    embeds = seen["embeds"].reshape(len(chosen), 64, -1)
    clean = untrained.encode_images(inputs.pixel_values).reshape(len(chosen), 64, -1)
    for b, it in enumerate(chosen):
        ablated = analysis.dilate(it.target_mask, 1).reshape(-1)
        assert torch.equal(embeds[b, ablated], mean.expand(int(ablated.sum()), -1))
        torch.testing.assert_close(embeds[b, ~ablated], clean[b, ~ablated])


def test_object_ablation_table(untrained, items):
    mean = studies.mean_token(untrained, organism.ShapesDataset("test", seed=4, size=8, organism="scenes"))
    study = studies.object_ablation(untrained, items, mean, buffers=(0, 2))
    chosen = studies.targeted(items)
    assert (study.n_items, study.n_excluded) == (len(chosen), len(items) - len(chosen))
    for buffer in (0, 2):
        row = study.row("all", buffer)
        assert row.n_items == len(chosen) and 0 < row.n_random <= row.n_items
        expected = np.mean([analysis.dilate(it.target_mask, buffer).sum() for it in chosen])
        assert row.tokens == pytest.approx(expected)
    assert (
        study.row("all", 2).n_random < study.row("all", 0).n_random
    )  # regions over half the grid: no control
    count = study.row("count", 0)
    assert count.n_items == sum(it.question_type == "count" for it in chosen)
    table = study.table()
    assert table.count("\n") == len(study.rows) + 1 and "| describe | 2 |" in table
    with pytest.raises(KeyError, match="have"):
        study.row("count", 1)


def test_logit_lens_hits_equal_a_hand_computation(untrained, items):
    item = next(it for it in items if len(it.objects) >= 2)
    k = 20  # of 49 tokens: an untrained model then names some objects' words somewhere
    study = studies.logit_lens_hits(untrained, [item], k=k)
    inputs = untrained.prepare(item.prompt, images=[item.image])
    _, cache = untrained.run_with_cache(inputs)
    grid = inputs.layout.grid(0)
    ids = untrained.tokenizer.convert_tokens_to_ids
    object_hits, background_hits = np.zeros((8, 2)), np.zeros((8, 2))
    background = ~np.any([o.patch_mask for o in item.objects], axis=0)
    for layer in range(8):
        resid = cache[f"blocks.{layer}.hook_resid_post"][0, grid.flatten()]
        top = untrained.unembed(untrained.ln_final(resid[None]))[0].topk(k, dim=-1).indices.reshape(8, 8, k)
        for obj in item.objects:
            for j, word in enumerate((obj.colour, obj.shape)):
                named = (top == ids(word)).any(-1).numpy()
                object_hits[layer, j] += named[obj.patch_mask].sum()
                background_hits[layer, j] += named[background].sum() / len(item.objects)
    n_object = sum(int(o.patch_mask.sum()) for o in item.objects)
    assert study.n_object_patches == n_object and study.n_background_patches == int(background.sum())
    np.testing.assert_allclose(study.object["colour"], object_hits[:, 0] / n_object, atol=1e-6)
    np.testing.assert_allclose(study.object["shape"], object_hits[:, 1] / n_object, atol=1e-6)
    np.testing.assert_allclose(study.background["shape"], background_hits[:, 1] / background.sum(), atol=1e-6)
    assert 0 < max(study.object["colour"] + study.object["shape"]) < 1  # the comparison is not 0 == 0
    assert all(
        e >= max(c, s)
        for e, c, s in zip(study.object["either"], study.object["colour"], study.object["shape"])
    )


def test_knockout_windows_cover_the_layers_and_block_the_answer(untrained, items):
    chosen = studies.targeted(items)[:7]
    study = studies.knockout_windows(untrained, chosen, window=3)
    assert study.windows == [list(range(s, s + 3)) for s in range(6)] and study.starts == list(range(6))
    assert set().union(*map(set, study.windows)) == set(range(untrained.cfg.n_layers))
    assert set(study.accuracy) == {"object", "rest of image", "last row"}
    assert all(len(v) == 6 for v in study.accuracy.values())
    assert "| 5-7 |" in study.table()

    describe = [it for it in chosen if it.question_type == "describe"]
    batch = describe + [it for it in chosen if it.question_type == "count"]
    inputs = untrained.prepare(
        [f"{it.prompt} {it.answer}" for it in batch], images=[[it.image] for it in batch]
    )
    queries = analysis.answer_positions(untrained, inputs, batch)
    assert [len(q) for q in queries] == [2] * len(describe) + [1] * (len(batch) - len(describe))
    for name, select in studies.KNOCKOUT_TARGETS.items():
        keys = select(inputs, batch, 1)
        hooks = studies.knock_out(untrained, select, [2, 3, 4], buffer=1)(inputs, batch)
        pattern = {}
        grab = [
            (f"blocks.{layer}.attn.hook_pattern", lambda v, hook: pattern.setdefault(hook.layer(), v))
            for layer in (1, 3)
        ]
        untrained.run_with_hooks(inputs, fwd_hooks=[*hooks, *grab])
        for b in range(len(batch)):
            q, k = queries[b], keys[b]
            assert pattern[3][b][:, q][..., k].abs().max() == 0, name  # blocked inside the window
            assert pattern[1][b][:, q][..., k].sum() > 0, name  # untouched outside it


# ---- the robust findings on the trained organism (held-out items) ----------------------------------------


@pytest.fixture(scope="module")
def trained():
    return organism.load(name="scenes")


@pytest.fixture(scope="module")
def held_out():
    return organism.ShapesDataset(split="test", seed=21, size=140, organism="scenes")[:]


@trained_only
def test_ablating_object_and_buffer_removes_the_answer_random_tokens_do_not(trained, held_out):
    mean = studies.mean_token(trained, organism.ShapesDataset("test", seed=22, size=64, organism="scenes"))
    row = studies.object_ablation(trained, held_out, mean, buffers=(1,)).row("all", 1)
    print(
        f"buffer 1: clean {row.clean:.3f}, object {row.object:.3f} ({row.object_drop:+.0f} pts), "
        f"random {row.random:.3f} on {row.n_random} items ({row.random_drop:+.0f} pts)"
    )
    assert row.object_drop >= 50
    assert row.random_drop <= 10


def _recoloured(item, obj):
    """The item's image with ``obj`` painted in a colour no object of the image has, and that colour."""
    colour = next(c for c in drawing.COLOURS if c not in {o.colour for o in item.objects})
    pixels = np.array(item.image)
    pixels[obj.pixel_mask] = drawing.COLOURS[colour]
    return Image.fromarray(pixels), colour


@trained_only
def test_grid_patching_puts_the_effect_on_the_changed_object(trained, held_out):
    shares = []
    for item in [it for it in held_out if it.question_type == "colour_of_shape"][:6]:
        obj = next(o for o in item.objects if o.colour == item.answer)
        image, colour = _recoloured(item, obj)
        clean, corrupt = (trained.prepare(item.prompt, images=[im]) for im in (item.image, image))
        ids = [analysis.answer_token(trained.tokenizer, w) for w in (item.answer, colour)]
        metric = analysis.logit_diff_metric(*ids)
        result = analysis.patch_image_positions(trained, clean, corrupt, metric, layers=[0])
        with torch.no_grad():
            effect = (result.values[0] - metric(trained(corrupt))).abs()
        shares.append(float(effect[torch.as_tensor(obj.patch_mask)].sum() / effect.sum()))
    print("share of the layer-0 patching effect on the recoloured object's patches:", np.round(shares, 3))
    assert np.mean(shares) >= 0.5
