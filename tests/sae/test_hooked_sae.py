"""HookedSAEVLM: SAE Lens's attach/detach API on a VLM, checked against hand-written splices."""

import pytest
import torch
from sae_helpers import make_sae

from vlm_lens import HookedVLM
from vlm_lens.sae import HookedSAEVLM

# (hook, d_in, extra SAE config): language model, a fast-path norm hook, attention heads, vision side
HOOKS = [
    ("blocks.1.hook_resid_pre", 32, {}),
    ("blocks.0.ln2.hook_normalized", 32, {}),
    ("ln_final.hook_normalized", 32, {}),
    ("blocks.0.attn.hook_z", 32, {"reshape_activations": "hook_z"}),
    ("vision.blocks.1.hook_resid_post", 24, {}),
    ("vision.blocks.0.ln1.hook_normalized", 24, {}),
    ("hook_image_embeds", 32, {}),
]


def splice(sae, keep=None):
    """The SAE's encode/decode written by hand as a TransformerLens hook (``keep``: where it applies)."""
    def hook(x, hook):
        recon = sae.decode(sae.encode(x))
        if keep is None:
            return recon
        mask = keep.reshape(*keep.shape, *([1] * (x.ndim - keep.ndim)))
        return torch.where(mask, recon, x)
    return hook


@pytest.mark.parametrize("hook,d_in,extra", HOOKS, ids=[h for h, _, _ in HOOKS])
def test_sae_splice_and_error_term(sae_model, raw_model, tiny_inputs, hook, d_in, extra):
    sae = make_sae(hook, d_in, **extra)
    with torch.no_grad():
        clean = raw_model(tiny_inputs)
        by_hand = raw_model.run_with_hooks(tiny_inputs, fwd_hooks=[(hook, splice(sae))])
        spliced = sae_model.run_with_saes(tiny_inputs, saes=[sae])
        with sae_model.saes([sae], use_error_term=True):
            kept, cache = sae_model.run_with_cache(tiny_inputs)
    assert (by_hand - clean).abs().max() > 1e-3  # the splice does something
    assert (spliced - by_hand).abs().max() <= 1e-5
    assert (kept - clean).abs().max() <= 1e-5
    for name in ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output"):
        assert f"{hook}.{name}" in cache
    assert cache[f"{hook}.hook_sae_acts_post"].shape[-1] == sae.cfg.d_sae
    assert hook in sae_model.hook_dict and not sae_model.acts_to_saes  # detached, hook point back


def test_loaders_build_the_subclass(llava_dir, raw_model, tiny_inputs):
    from transformers import LlavaForConditionalGeneration

    from vlm_lens import organism

    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    models = [HookedSAEVLM.from_pretrained(str(llava_dir)), HookedSAEVLM.from_pretrained_no_processing(str(llava_dir)),
              HookedSAEVLM.from_hf(hf, processor=raw_model.processor)]
    assert all(type(m) is HookedSAEVLM for m in models)
    with torch.no_grad():
        assert torch.equal(models[1](tiny_inputs), raw_model(tiny_inputs))
        assert torch.allclose(models[2](tiny_inputs), raw_model(tiny_inputs), atol=1e-5)
        processed = HookedVLM.from_pretrained(str(llava_dir))(tiny_inputs)
        assert torch.equal(models[0](tiny_inputs), processed)
    assert type(organism.load(model_class=HookedSAEVLM)) is HookedSAEVLM


def test_mlp_hook_in_fires_and_changes_the_output(sae_model, raw_model, tiny_inputs):
    # SAE Lens adds blocks.{l}.mlp.hook_in (for transcoders); it must be live and leave logits unchanged
    seen = []
    with torch.no_grad():
        logits = sae_model.run_with_hooks(tiny_inputs, fwd_hooks=[("blocks.1.mlp.hook_in", lambda x, hook: seen.append(x.shape))])
        zeroed = sae_model.run_with_hooks(tiny_inputs, fwd_hooks=[("blocks.1.mlp.hook_in", lambda x, hook: 0 * x)])
        assert torch.equal(logits, raw_model(tiny_inputs))
    assert seen == [(2, tiny_inputs.tokens.shape[1], 32)]
    assert (zeroed - logits).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["image", "text", [0, 5, -1], "mask"])
def test_positions_restrict_the_splice(sae_model, raw_model, tiny_inputs, positions):
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae(hook, 32)
    image = tiny_inputs.image_mask
    if positions == "mask":
        positions = torch.zeros_like(image)
        positions[0, 3:9] = True
        positions[1, -2:] = True
    keep = {"image": image, "text": ~image}.get(positions) if isinstance(positions, str) else None
    if keep is None:
        keep = positions if torch.is_tensor(positions) else torch.zeros_like(image)
        if not torch.is_tensor(positions):
            keep[:, positions] = True
    with torch.no_grad():
        by_hand = raw_model.run_with_hooks(tiny_inputs, fwd_hooks=[(hook, splice(sae, keep))])
        restricted = sae_model.run_with_saes(tiny_inputs, saes=[sae], positions=positions)
        with sae_model.saes([sae], use_error_term=True, positions=positions):
            kept, cache = sae_model.run_with_cache(tiny_inputs)
        clean = raw_model(tiny_inputs)
    assert (restricted - by_hand).abs().max() <= 1e-5
    assert (kept - clean).abs().max() <= 1e-5
    error = cache[f"{hook}.hook_sae_error"]
    assert error[~keep].abs().max() == 0 and error[keep].abs().max() > 0  # bypassed positions carry no error


def test_attached_saes_work_in_run_with_hooks_and_generate(sae_model, raw_model, tiny_inputs):
    hook = "blocks.0.hook_resid_post"
    sae = make_sae(hook, 32, scale=0.2)
    seen = []
    sae_model.add_sae(sae, positions="image")
    try:
        with torch.no_grad():
            logits = sae_model.run_with_hooks(tiny_inputs, fwd_hooks=[(f"{hook}.hook_sae_acts_post", lambda x, hook: seen.append(x))])
            by_hand = raw_model.run_with_hooks(tiny_inputs, fwd_hooks=[(hook, splice(sae, tiny_inputs.image_mask))])
        assert len(seen) == 1 and (logits - by_hand).abs().max() <= 1e-5
        ours = sae_model.generate(tiny_inputs, max_new_tokens=4, stop_at_eos=False)
        # by hand: the image tokens are all in the prompt step (the first call); later steps are one new token
        prompt_len = tiny_inputs.tokens.shape[1]
        ref = raw_model.generate(tiny_inputs, max_new_tokens=4, stop_at_eos=False, fwd_hooks=[
            (hook, lambda x, hook: splice(sae, tiny_inputs.image_mask)(x, hook) if x.shape[1] == prompt_len else x)])
        assert torch.equal(ours, ref) and not torch.equal(ours, raw_model.generate(tiny_inputs, max_new_tokens=4,
                                                                                 stop_at_eos=False))
    finally:
        sae_model.reset_saes()


def test_given_positions_follow_cached_generation(sae_model, tiny_inputs):
    sae = make_sae("blocks.1.hook_resid_pre", 32, scale=0.2)
    length = tiny_inputs.tokens.shape[1]
    positions = [2, length - 1, length + 1]  # one prompt token, the last prompt token, the second new token
    with sae_model.saes([sae], positions=positions):
        cached = sae_model.generate(tiny_inputs, max_new_tokens=4, stop_at_eos=False)
        uncached = sae_model.generate(tiny_inputs, max_new_tokens=4, stop_at_eos=False, use_past_kv_cache=False)
    plain = sae_model.generate(tiny_inputs, max_new_tokens=4, stop_at_eos=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)


def test_saes_context_restores_what_was_attached(sae_model, raw_model, tiny_inputs):
    hook = "blocks.1.hook_resid_pre"
    first, second = make_sae(hook, 32, seed=1), make_sae(hook, 32, seed=2)
    with torch.no_grad():
        sae_model.add_sae(first, positions="image")
        before = sae_model(tiny_inputs)
        with sae_model.saes([second, make_sae("hook_image_embeds", 32)]):
            assert sae_model.acts_to_saes[hook] is second and len(sae_model.acts_to_saes) == 2
            inside = sae_model(tiny_inputs)
        assert sae_model.acts_to_saes == {hook: first}
        assert torch.equal(sae_model(tiny_inputs), before) and not torch.equal(inside, before)
        sae_model.reset_saes()
        assert not sae_model.acts_to_saes and torch.equal(sae_model(tiny_inputs), raw_model(tiny_inputs))


def test_exclude_special_tokens_combines_with_positions(sae_model, raw_model, tiny_inputs):
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae(hook, 32)
    from sae_lens.util import get_special_token_ids

    special = torch.isin(tiny_inputs.tokens, torch.tensor(get_special_token_ids(sae_model.tokenizer)))
    assert special[:, 0].any() and (tiny_inputs.tokens == 0).any()  # BOS and padding are both there
    keep = ~tiny_inputs.image_mask & ~special
    with torch.no_grad():
        ours = sae_model.run_with_saes(tiny_inputs, saes=[sae], positions="text", exclude_special_tokens=True)
        by_hand = raw_model.run_with_hooks(tiny_inputs, fwd_hooks=[(hook, splice(sae, keep))])
    assert (ours - by_hand).abs().max() <= 1e-5


def test_errors_teach(sae_model, tiny_inputs):
    with pytest.raises(ValueError, match="language-model hook"):
        sae_model.add_sae(make_sae("vision.blocks.1.hook_resid_post", 24), positions="image")
    with pytest.raises(ValueError, match="language-model hook"):
        sae_model.add_sae(make_sae("blocks.0.attn.hook_pattern", 4), positions=[1])
    with pytest.raises((ValueError, TypeError), match="'all', 'image', 'text'"):  # TypeError: beartype under pytest
        sae_model.add_sae(make_sae("blocks.0.hook_resid_post", 32), positions="images")
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        sae_model.add_sae(make_sae("blocks.0.hook_resid_post", 32), positions=torch.ones(3, dtype=torch.bool))
    assert not sae_model.acts_to_saes
    with sae_model.saes([make_sae("blocks.0.hook_resid_post", 32)], positions=[-500]):
        with pytest.raises(ValueError, match="count back past the start"):
            sae_model(tiny_inputs)


def test_an_unknown_hook_name_is_an_error_and_attaches_nothing(sae_model):
    with pytest.raises(ValueError, match="no hook point 'blocks.99.hook_resid_post'"):
        sae_model.add_sae(make_sae("blocks.99.hook_resid_post", 32))
    assert not sae_model.acts_to_saes
