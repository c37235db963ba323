"""Input-agnostic key detection, its knockout, the prefix comparison and the probe-vs-output gap."""

import pytest
import torch

from vlm_lens.analysis import evaluate
from vlm_lens.analysis.probing import (
    answer_probe,
    artifact_knockout,
    choice_correct,
    compare_prefix,
    find_input_agnostic_keys,
    pool_regions,
    prepare_batches,
    probe_output_gap,
    read_kv,
)

from .conftest import PROMPT, make_image


class Item:
    def __init__(self, seed, answer="cat"):
        self.image, self.prompt, self.answer = make_image(seed), PROMPT, answer


def test_detector_finds_a_constant_key_in_synthetic_keys():
    keys = torch.randn(3, 20, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    keys[1, :, 2, 3] = torch.linspace(-1, 1, 8)  # the same key in every image, layer 1 only
    found = find_input_agnostic_keys(keys, layers=[4, 5, 6])
    assert found.mask.sum() == 1 and found.cells(5)[2, 3] and not found.cells(4).any()
    assert found.ratio[1, 2, 3] == 0 and found.variance.shape == (3, 4, 4)
    assert "L5: 1" in repr(found)
    with pytest.raises(ValueError, match="several images"):
        find_input_agnostic_keys(keys[:, :1])


def _plant(layer, cell, layout_fn):
    """A hook that writes one fixed key at grid cell ``cell`` of every image."""
    def hook(k, hook):
        layout = layout_fn()
        k = k.clone()
        for i in range(layout.n_images):
            k[layout.batch_of(i), layout.position(i, *cell)] = torch.arange(k.shape[-1], dtype=k.dtype)
        return k
    return (f"blocks.{layer}.attn.hook_k", hook)


def test_planted_constant_key_is_found_on_the_model_and_knocked_out(raw_model):
    items = [Item(s) for s in range(8)]
    batches = prepare_batches(raw_model, items, batch_size=4)
    current = {}

    def plant_factory(inputs, _items):
        current["layout"] = inputs.layout
        return [_plant(1, (1, 2), lambda: current["layout"])]

    readout = read_kv(raw_model, batches, sites=("k",), fwd_hooks=plant_factory)
    found = find_input_agnostic_keys(readout.stack("k"), layers=readout.layers)
    assert found.cells(1)[1, 2] and found.cells(1).sum() == 1
    assert not found.cells(0).any()  # the model's own keys vary with the image

    knock = artifact_knockout(found)
    inputs = batches[0]
    hooks = knock(inputs, [])
    assert [name for name, _ in hooks] == ["blocks.1.attn.hook_attn_scores"]
    seen = {}
    spy = ("blocks.1.attn.hook_pattern", lambda p, hook: seen.__setitem__("p", p.clone()))
    raw_model.run_with_hooks(inputs, fwd_hooks=hooks + [spy])
    pattern = seen["p"]
    last = inputs.tokens.shape[1] - 1
    for i in range(inputs.layout.n_images):
        b, pos = inputs.layout.batch_of(i), inputs.layout.position(i, 1, 2)
        assert pattern[b, :, last, pos].abs().max() == 0  # text query no longer reads the artifact key
        assert pattern[b, :, pos, pos].min() > 0  # image queries still do (queries="text")
    # end to end through the evaluation harness and a probe under the knockout
    result = evaluate(raw_model, items, hooks=knock, batch_size=4)
    assert result.correct.shape == (8,)
    knocked = read_kv(raw_model, batches, sites=("v",), fwd_hooks=knock)
    assert knocked.features("v", 1).shape == (8, 4, 4, raw_model.cfg.n_key_value_heads * raw_model.cfg.d_head)


def test_compare_prefix_returns_both_and_delta(raw_model):
    items = [Item(s) for s in range(4)]
    masks = torch.zeros(4, 4, 4, dtype=torch.bool)
    masks[:, :2] = True

    def score(readout):
        return readout.features("v", 1).norm(dim=-1).mean()[None]

    out = compare_prefix(raw_model, items, "red cat", score, sites=("v",), layers=[1])
    assert set(out) == {"without", "with", "delta"} and out["delta"].shape == (1,)
    assert out["delta"].abs().item() > 0


def test_probe_output_gap_counts():
    probe = torch.tensor([[True, True, False, False], [True, False, True, True]])
    model = torch.tensor([True, False, False, True])
    gap = probe_output_gap(probe, model)
    assert gap.model_accuracy == 0.5
    torch.testing.assert_close(gap.probe_accuracy, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(gap.probe_right_model_wrong, torch.tensor([0.25, 0.25]))
    torch.testing.assert_close(gap.recovered, torch.tensor([0.5, 0.5]))
    assert torch.isnan(probe_output_gap(probe, torch.ones(4, dtype=torch.bool)).recovered).all()


def test_answer_probe_reads_a_planted_answer():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=g)
    feats = torch.randn(2, 40, 4, 4, 6, generator=g)
    regions = torch.zeros(40, 4, 4, dtype=torch.bool)
    regions[:, 1:3, 1:3] = True
    feats[1, :, 1:3, 1:3, :3] += 3 * torch.nn.functional.one_hot(labels, 3).float()[:, None, None]
    correct = answer_probe(feats, labels, n_train=20, regions=regions)
    assert correct.shape == (2, 20) and correct[1].all() and correct[0].float().mean() < 0.8
    torch.testing.assert_close(pool_regions(feats, regions)[0], feats[0, :, 1:3, 1:3].mean((1, 2)))
    empty = regions.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="empty region"):
        pool_regions(feats, empty)


def test_choice_correct_matches_restricted_argmax(raw_model):
    items = [Item(s, answer="cat" if s % 2 else "dog") for s in range(4)]
    ok = choice_correct(raw_model, items, ["cat", "dog"], batch_size=3)
    assert ok.shape == (4,) and ok.dtype == torch.bool
    with pytest.raises(ValueError, match="not among"):
        choice_correct(raw_model, items, ["red"])
