import pytest
import torch

from vlm_lens.analysis import (
    embed_ablation_hooks,
    image_ablation_hooks,
    load_mean,
    mean_visual_token,
    save_mean,
)

from .conftest import make_image


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


def test_embed_ablation_replaces_each_position_in_the_call_that_embeds_it(raw_model, one):
    """With the KV cache a step embeds only its new tokens: prompt positions are ablated at the prefill alone
    (also position 0, which every one-token step would otherwise hit), as without the cache."""
    hooks = embed_ablation_hooks([0], "zero")
    kwargs = dict(max_new_tokens=5, fwd_hooks=hooks, stop_at_eos=False, return_type="new_tokens")
    cached = raw_model.generate(one, **kwargs)
    uncached = raw_model.generate(one, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    n = one.tokens.shape[1]
    seen = []
    spy = ("hook_embed", lambda v, hook: seen.append(bool((v[0, -1] == 0).all())))
    raw_model.generate(one, max_new_tokens=3, fwd_hooks=embed_ablation_hooks([n + 1], "zero") + [spy],
                       stop_at_eos=False)
    assert seen == [False, False, True]  # prefill, the token at n, the token at n + 1


def test_embed_ablation_skips_only_positions_past_the_call(raw_model, one):
    n = one.tokens.shape[1]
    with torch.no_grad():
        alone = _embed_after(raw_model, one, embed_ablation_hooks([5], "zero"))
        with_future = _embed_after(raw_model, one, embed_ablation_hooks([5, n + 3], "zero"))
    assert alone[0, 5].abs().max() == 0 and torch.equal(alone, with_future)
    with pytest.raises(ValueError, match="absolute"):
        embed_ablation_hooks([-1], "zero")


def test_embed_noise_is_matched_to_the_row_without_its_padding(raw_model, two):
    """The same item gets the same matched noise alone and as the padded row of a batch."""
    assert two.needs_attention_mask and (two.attention_mask[1] == 0).any()  # row 1 is the padded one
    alone = raw_model.prepare("USER : <image>\ndescribe ASSISTANT :", images=[make_image(2)])
    pad = int((two.attention_mask[1] == 0).sum())
    with torch.no_grad():
        batched = _embed_after(raw_model, two, embed_ablation_hooks(
            [[], [pad + 2, pad + 3]], "noise", seed=3, inputs=two))
        single = _embed_after(raw_model, alone, embed_ablation_hooks([2, 3], "noise", seed=3, inputs=alone))
    # row 0 draws nothing, so row 1 draws the same numbers as the item alone
    assert torch.allclose(batched[1, pad + 2: pad + 4], single[0, 2:4], atol=1e-5)
    with pytest.raises(ValueError, match="inputs="):
        embed_ablation_hooks([1], "noise")
