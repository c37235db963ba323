import pytest
import torch

from vlm_lens.analysis import (
    embed_ablation_hooks,
    image_ablation_hooks,
    load_mean,
    mean_visual_token,
    save_mean,
)


def _embed_after(model, inputs, hooks):
    store = {}
    model.run_with_hooks(inputs, fwd_hooks=hooks + [("hook_embed", lambda v, hook: store.setdefault("e", v.clone()))])
    return store["e"]


def test_zero_ablation_hits_exactly_the_positions(raw_model, two):
    positions = [torch.tensor([two.layout.position(0, 0, 0), two.layout.position(0, 3, 3)]),
                 torch.tensor([two.layout.position(1, 1, 1)])]
    with torch.no_grad():
        base = _embed_after(raw_model, two, [])
        ablated = _embed_after(raw_model, two, image_ablation_hooks(two, positions, "zero"))
    changed = (base - ablated).abs().amax(-1) > 0
    expected = torch.zeros_like(changed)
    expected[0, positions[0]] = True
    expected[1, positions[1]] = True
    assert torch.equal(changed, expected)
    assert ablated[0, positions[0]].abs().max() == 0


def test_mean_and_noise_and_tensor_replacements(raw_model, one, tmp_path):
    mean = mean_visual_token(raw_model, one)
    save_mean(mean, tmp_path / "mean.safetensors")
    assert torch.equal(load_mean(tmp_path / "mean.safetensors"), mean)
    pos = one.layout.grid(0)[1]
    with torch.no_grad():
        base = _embed_after(raw_model, one, [])
        m = _embed_after(raw_model, one, image_ablation_hooks(one, pos, "mean", mean=mean))
        n = _embed_after(raw_model, one, image_ablation_hooks(one, pos, "noise", seed=0))
        t = _embed_after(raw_model, one, image_ablation_hooks(one, pos, torch.ones(raw_model.cfg.d_model)))
    assert torch.allclose(m[0, pos], mean.expand(len(pos), -1))
    image = base[0, one.layout.image_positions()]
    assert 0.3 < n[0, pos].std() / image.std() < 3  # matched scale
    assert torch.all(t[0, pos] == 1)
    with pytest.raises(ValueError, match="mean="):
        image_ablation_hooks(one, pos, "mean")[0][1](base, None)


def test_text_positions_rejected_for_image_ablation(one):
    with pytest.raises(ValueError, match="not image tokens"):
        image_ablation_hooks(one, torch.tensor([0]), "zero")


def test_ablation_is_prefill_only_in_generation(raw_model, one):
    pos = one.layout.image_positions()
    hooks = image_ablation_hooks(one, pos, "zero") + embed_ablation_hooks(torch.tensor([1]), "zero")
    new = raw_model.generate(one, max_new_tokens=4, fwd_hooks=hooks, stop_at_eos=False, return_type="new_tokens")
    with torch.no_grad():
        first = raw_model.run_with_hooks(one, fwd_hooks=hooks)[0, -1].argmax()
    assert new[0, 0] == first
    # without the KV cache the ablation is applied on every step and gives the same tokens
    again = raw_model.generate(one, max_new_tokens=4, fwd_hooks=hooks, stop_at_eos=False, return_type="new_tokens",
                               use_past_kv_cache=False)
    assert torch.equal(new, again)
