import pytest
import torch

from vlm_lens.analysis import knockout_hooks, layer_window, sliding_windows


def test_paper_windows_scale():
    assert layer_window("early", 32) == list(range(0, 10))
    assert layer_window("late", 32) == list(range(21, 32))
    assert layer_window("all", 4) == [0, 1, 2, 3]
    assert all(layer_window(w, 4) for w in ("early", "early-mid", "mid", "mid-late", "late"))
    assert sliding_windows(5, 3) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    with pytest.raises(ValueError, match="window"):
        layer_window("middle", 32)


def _patterns(model, inputs, hooks, names):
    store = {}
    fwd = hooks + [(n, lambda v, hook: store.__setitem__(hook.name, v.clone())) for n in names]
    with torch.no_grad():
        logits = model.run_with_hooks(inputs, fwd_hooks=fwd)
    return logits, store


def test_knockout_blocks_exactly_the_pairs(raw_model, one):
    last = one.tokens.shape[1] - 1
    keys = one.layout.grid(0)[0]
    hooks = knockout_hooks([last], keys, [1], heads=[2])
    logits, store = _patterns(raw_model, one, hooks, ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_pattern"])
    p1 = store["blocks.1.attn.hook_pattern"]
    assert p1[0, 2, last, keys].abs().max() == 0
    assert torch.allclose(p1[0, 2, last].sum(), torch.tensor(1.0))
    _, base = _patterns(raw_model, one, [], ["blocks.1.attn.hook_pattern"])
    b1 = base["blocks.1.attn.hook_pattern"]
    assert b1[0, 2, last, keys].min() > 0
    others = torch.ones_like(p1, dtype=torch.bool)
    others[0, 2, last] = False
    assert torch.allclose(p1[others], b1[others])  # other heads and queries untouched (GQA shares keys)
    assert not torch.allclose(logits, raw_model(one), atol=1e-6)


def test_knockout_in_vision_tower(raw_model, one):
    hooks = knockout_hooks([0], torch.arange(1, 17), [0], tower="vision")
    _, store = _patterns(raw_model, one, hooks, ["vision.blocks.0.attn.hook_pattern"])
    pattern = store["vision.blocks.0.attn.hook_pattern"]
    assert pattern[0, :, 0, 1:].abs().max() == 0 and torch.allclose(pattern[0, :, 0, 0], torch.ones(4))


def test_knockout_applies_to_generated_queries_with_kv_cache(raw_model, one):
    n = one.tokens.shape[1]
    keys = one.layout.image_positions()
    seen = []
    hooks = knockout_hooks(list(range(n - 1, n + 3)), keys, "all", n_layers=raw_model.cfg.n_layers)
    spy = [("blocks.0.attn.hook_pattern", lambda v, hook: seen.append(v[0, :, -1, keys].abs().max().item()))]
    raw_model.generate(one, max_new_tokens=3, fwd_hooks=hooks + spy, stop_at_eos=False)
    assert seen == [0.0, 0.0, 0.0]


def test_knockout_refuses_negative_positions():
    """-1 would silently match nothing as a query and wrap around as a key: positions are absolute."""
    with pytest.raises(ValueError, match="query_positions must be absolute"):
        knockout_hooks([-1], [3], [0])
    with pytest.raises(ValueError, match="key_positions must be absolute"):
        knockout_hooks([5], [[0, 1], [-2]], [0])


def test_knockout_reads_a_grid_tensor_for_every_row_and_a_list_per_row(raw_model, two):
    """A tensor of any shape (a grid) applies to every row; a list gives each row its own positions."""
    last = two.tokens.shape[1] - 1
    grid = two.layout.grid(0)  # [4, 4]
    with torch.no_grad():
        as_grid = raw_model.run_with_hooks(two, fwd_hooks=knockout_hooks([last], grid, [0, 1]))
        flat = raw_model.run_with_hooks(two, fwd_hooks=knockout_hooks([last], grid.flatten(), [0, 1]))
        own = [two.layout.grid(i).flatten() for i in range(2)]
        per_row = raw_model.run_with_hooks(two, fwd_hooks=knockout_hooks([last], own, [0, 1]))
        row1_alone = raw_model.run_with_hooks(two, fwd_hooks=knockout_hooks([[], [last]], [[], own[1]], [0, 1]))
    assert torch.equal(as_grid, flat)
    assert torch.equal(per_row[1], row1_alone[1]) and not torch.allclose(per_row[1], as_grid[1])
    with pytest.raises(ValueError, match=r"pass \[5\]"):
        knockout_hooks(5, grid, [0])
    assert not any(h.fwd_hooks for h in raw_model.hook_dict.values())
