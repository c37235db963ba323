"""The fast components (vlm_lens._tl.fast) compute what TransformerLens's own components compute.

The fused attention runs only while nobody hooks the scores or the pattern; attaching such a hook
switches that one layer to the explicit computation, and removing it switches back.
"""

import pytest
import torch
import torch.nn.functional as F
from transformer_lens.components import Attention, GroupedQueryAttention, TransformerBlock

from vlm_lens._tl.fast import (
    FastAttention,
    FastGroupedQueryAttention,
    FastTransformerBlock,
    install_fast_components,
    uninstall_fast_components,
)
from vlm_lens.testing import image_prompt_tokens, random_pixels

ATOL = 1e-5


@pytest.fixture()
def inputs(raw_model):
    return image_prompt_tokens(raw_model.vlm_cfg.n_image_tokens, batch=2, seed=7), random_pixels(2, seed=8)


@pytest.fixture()
def sdpa_calls(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def _tl_logits(model, *args, **kwargs):
    uninstall_fast_components(model)
    try:
        return model(*args, **kwargs)
    finally:
        install_fast_components(model)


def test_components_are_swapped_in_language_model_and_vision(raw_model):
    assert isinstance(raw_model.blocks[0].attn, FastGroupedQueryAttention)
    assert isinstance(raw_model.vision.blocks[0].attn, FastAttention)
    assert all(isinstance(b, FastTransformerBlock) for b in [*raw_model.blocks, *raw_model.vision.blocks])
    assert isinstance(raw_model.blocks[0].attn, GroupedQueryAttention)  # still TransformerLens classes
    assert isinstance(raw_model.vision.blocks[0], TransformerBlock)
    n = uninstall_fast_components(raw_model)
    try:
        assert type(raw_model.vision.blocks[0].attn) is Attention
    finally:
        assert install_fast_components(raw_model) == n


def test_fast_path_equals_transformer_lens_path(raw_model, inputs, sdpa_calls):
    tokens, pixels = inputs
    with torch.no_grad():
        fast = raw_model(tokens, pixel_values=pixels)
        n_fused = len(sdpa_calls)
        plain = _tl_logits(raw_model, tokens, pixel_values=pixels)
        explicit = raw_model.run_with_hooks(tokens, pixel_values=pixels, fwd_hooks=[
            (lambda name: name.endswith("hook_pattern"), lambda pattern, hook: pattern)])
    assert n_fused == raw_model.cfg.n_layers + len(raw_model.vision.blocks)
    assert len(sdpa_calls) == n_fused  # neither the plain nor the hooked run used the fused kernel
    assert (fast - plain).abs().max() <= ATOL
    assert (fast - explicit).abs().max() <= ATOL


def test_pattern_hook_switches_one_layer_and_back(raw_model, inputs, sdpa_calls):
    tokens, pixels = inputs
    n_attention = raw_model.cfg.n_layers + len(raw_model.vision.blocks)
    seen = []

    def look(pattern, hook):
        seen.append(pattern.detach().clone())

    with torch.no_grad():
        before = raw_model(tokens, pixel_values=pixels)
        assert len(sdpa_calls) == n_attention
        raw_model.blocks[0].attn.hook_pattern.add_hook(look)
        try:
            hooked = raw_model(tokens, pixel_values=pixels)
        finally:
            raw_model.reset_hooks()
        assert len(sdpa_calls) == 2 * n_attention - 1  # every layer but blocks.0 stayed fused
        after = raw_model(tokens, pixel_values=pixels)
        assert len(sdpa_calls) == 3 * n_attention - 1
    (pattern,) = seen
    assert pattern.shape == (2, raw_model.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
    assert (pattern.triu(1) == 0).all()  # causal
    assert (before - hooked).abs().max() <= ATOL and torch.equal(before, after)


def test_pattern_edits_take_effect(raw_model, inputs):
    tokens, pixels = inputs

    def uniform(pattern, hook):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        base = raw_model(tokens, pixel_values=pixels)
        edited = raw_model.run_with_hooks(tokens, pixel_values=pixels,
                                          fwd_hooks=[("blocks.1.attn.hook_pattern", uniform)])
    assert not torch.allclose(base, edited, atol=1e-4)


def test_left_padding_matches(raw_model, inputs):
    tokens, pixels = inputs
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # two pad positions at the start of row 0 (queries that see nothing)
    with torch.no_grad():
        fast = raw_model(tokens, pixel_values=pixels, attention_mask=mask)
        plain = _tl_logits(raw_model, tokens, pixel_values=pixels, attention_mask=mask)
    assert torch.isfinite(fast).all()
    assert (fast - plain).abs().max() <= ATOL


def test_gradients_match(raw_model, inputs):
    tokens, pixels = inputs
    weight = raw_model.blocks[0].attn.W_Q

    def grad_of(run):
        raw_model.zero_grad()
        run().log_softmax(-1)[:, -1].sum().backward()
        return weight.grad.clone()

    fast = grad_of(lambda: raw_model(tokens, pixel_values=pixels))
    plain = grad_of(lambda: _tl_logits(raw_model, tokens, pixel_values=pixels))
    raw_model.zero_grad()
    assert (fast - plain).abs().max() <= ATOL * max(1.0, plain.abs().max().item())


def test_generation_rotary_keys_match_every_step(raw_model, inputs):
    """Keys rotated on earlier steps are reused; hook_rot_k must still see what TransformerLens computes."""
    tokens, pixels = inputs
    runs = {}
    for label in ("fast", "plain"):
        keys = []
        hook = ("blocks.1.attn.hook_rot_k", lambda k, hook: keys.append(k.clone()))
        if label == "plain":
            uninstall_fast_components(raw_model)
        try:
            out = raw_model.generate(tokens[:1], pixel_values=pixels[:1], max_new_tokens=4, stop_at_eos=False,
                                     fwd_hooks=[hook])
        finally:
            install_fast_components(raw_model)
        runs[label] = (out, keys)
    assert torch.equal(runs["fast"][0], runs["plain"][0])
    assert [k.shape for k in runs["fast"][1]] == [k.shape for k in runs["plain"][1]]
    for fast, plain in zip(runs["fast"][1], runs["plain"][1], strict=True):
        assert (fast - plain).abs().max() <= ATOL


def test_a_module_standing_in_for_a_hook_point_always_runs(raw_model, inputs):
    """SAE Lens puts its wrapper where a HookPoint was; the fused norm/attention must not skip it."""
    tokens, pixels = inputs

    class Doubler(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    with torch.no_grad():
        clean = raw_model(tokens, pixel_values=pixels)
        for parent_name, child in (("blocks.0.ln1", "hook_normalized"), ("blocks.1.attn", "hook_pattern")):
            parent = raw_model.get_submodule(parent_name)
            original = getattr(parent, child)
            setattr(parent, child, Doubler())
            try:
                assert not torch.allclose(raw_model(tokens, pixel_values=pixels), clean, atol=1e-4), parent_name
            finally:
                setattr(parent, child, original)
        assert torch.equal(raw_model(tokens, pixel_values=pixels), clean)


@pytest.mark.parametrize("layout", ["hugging face", "transformer lens"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_head_projection_reads_either_weight_layout(layout, with_bias):
    """One GEMM over HF's [head * d_head, d_model] storage (what the loaders keep), or a GEMM per head over
    TransformerLens's contiguous [head, d_model, d_head] layout: the same projection."""
    import einops

    from vlm_lens._tl.fast.attention import _heads_as_matrix, project_heads

    torch.manual_seed(0)
    weight = einops.rearrange(torch.randn(4 * 8, 16), "(n h) m -> n m h", n=4)
    if layout == "transformer lens":
        weight = weight.contiguous()
    assert (_heads_as_matrix(weight) is None) == (layout == "transformer lens")
    x, bias = torch.randn(2, 5, 16), torch.randn(4, 8) if with_bias else torch.zeros(4, 8)
    expected = torch.einsum("bpm,nmh->bpnh", x, weight) + bias
    torch.testing.assert_close(project_heads(x, weight, bias), expected)


def test_zero_biases_edited_through_data_and_trained_act_as_in_transformer_lens(llava_dir):
    """The fast path leaves all-zero biases out on CPU; an edit through .data (no version bump) must still
    count, and a bias autograd may train must get its gradient."""
    from vlm_lens import HookedVLM

    tokens = torch.tensor([[1, 5, 9, 13, 17, 21, 25]])
    outputs, grads = {}, {}
    for fast in (False, True):
        model = HookedVLM.from_pretrained_no_processing(str(llava_dir), fast=fast)
        with torch.no_grad():
            before = model(tokens)
            model.blocks[0].attn.b_O.data += 1.0
            model.blocks[1].mlp.b_out.data.fill_(0.5)
            model.unembed.b_U.data[7] = 3.0
            outputs[fast] = (model(tokens), before)
        model.zero_grad()
        model(tokens)[0, -1].logsumexp(-1).backward()
        grads[fast] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
                       if n in ("blocks.0.attn.b_Q", "blocks.0.mlp.b_in", "blocks.1.attn.b_O")}
    assert not torch.allclose(*outputs[True], atol=1e-3)
    assert torch.allclose(outputs[True][0], outputs[False][0], atol=ATOL)
    for name, grad in grads[False].items():
        assert grads[True][name] is not None, name
        assert torch.allclose(grads[True][name], grad, atol=ATOL), name
