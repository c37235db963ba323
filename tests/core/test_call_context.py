"""Per-call state lives in the call: nothing outlives a forward or a generate, also when a hook raises."""

import pytest
import torch

from vlm_lens import HookedVLM
from vlm_lens.architectures.qwen2_5_vl import testing as fq
from vlm_lens.architectures.qwen2_5_vl.vision import VISION_CALL
from vlm_lens.context import CALL
from vlm_lens.testing import seeded_image


class Boom(RuntimeError):
    pass


def _raise_on_call(n):
    """A hook that raises on its n-th call (1-based)."""
    calls = []

    def hook(value, hook):
        calls.append(1)
        if len(calls) == n:
            raise Boom(f"hook {hook.name} raised on call {n}")
        return value

    return hook


def _assert_clean(model):
    assert CALL.get() is None and VISION_CALL.get() is None
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())
    # no per-call state on long-lived modules
    assert not any(k.startswith("_image") for k in vars(model.embed))
    assert not hasattr(model, "_generation_images")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path, _ = fq.save_qwen(tmp_path_factory.mktemp("qwen-ctx"))
    model = HookedVLM.from_pretrained_no_processing(str(path))
    inputs = model.prepare(fq.PROMPTS, images=[[fq.image(fq.SIZES["wide"], 0)], [fq.image(fq.SIZES["tall"], 1)]])
    return model, inputs


@pytest.fixture(scope="module")
def llava(raw_model):
    img = seeded_image((20, 20), 0)
    return raw_model, raw_model.prepare(["USER : <image>\nwhat is this ? ASSISTANT :"] * 2, images=[[img], [img]])


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("hook_name", ["vision.blocks.0.hook_resid_post", "hook_image_embeds",
                                       "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"])
def test_a_hook_raising_mid_forward_leaves_nothing_behind(request, family, hook_name):
    model, inputs = request.getfixturevalue(family)
    with torch.no_grad():
        clean = model(inputs)
        with pytest.raises(Boom):
            model.run_with_hooks(inputs, fwd_hooks=[(hook_name, _raise_on_call(1))])
        _assert_clean(model)
        assert torch.equal(model(inputs), clean)


@pytest.mark.parametrize("family", ["llava", "qwen"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_hook_raising_mid_generate_leaves_nothing_behind(request, family, use_cache):
    model, inputs = request.getfixturevalue(family)
    clean = model.generate(inputs, max_new_tokens=4, use_past_kv_cache=use_cache, stop_at_eos=False)
    with pytest.raises(Boom):  # the third step: the images were encoded, the KV cache and positions are filled
        model.generate(inputs, max_new_tokens=4, use_past_kv_cache=use_cache, stop_at_eos=False,
                       fwd_hooks=[("blocks.0.hook_resid_post", _raise_on_call(3))])
    _assert_clean(model)
    assert torch.equal(model.generate(inputs, max_new_tokens=4, use_past_kv_cache=use_cache, stop_at_eos=False),
                       clean)


def test_context_is_bound_only_inside_the_call(llava):
    model, inputs = llava
    seen = []

    def look(value, hook):
        call = CALL.get()
        seen.append(call is not None and call.image_mask is not None)
        return value

    with torch.no_grad():
        model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", look)])
    assert seen == [True] and CALL.get() is None


def test_a_text_only_call_inside_a_hook_does_not_disturb_the_outer_call(llava):
    """A hook that runs the same model on text keeps its own context; the outer call's images still merge."""
    model, inputs = llava
    with torch.no_grad():
        clean = model(inputs)

        depth = []

        def nested(value, hook):
            if not depth:  # the nested call fires this hook too
                depth.append(1)
                model(model.to_tokens("what is this ?"))
            return value

        assert torch.equal(model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.hook_resid_pre", nested)]), clean)


def test_manual_kv_cache_with_mrope_is_refused_with_a_pointer_to_generate(qwen):
    from vlm_lens._tl.kv_cache import new_cache

    model, inputs = qwen
    cache = new_cache(model.cfg, model.cfg.device, 2)
    with torch.no_grad():
        model(inputs, past_kv_cache=cache)
        with pytest.raises(ValueError, match="model.generate"):
            model(torch.tensor([[8], [9]]), past_kv_cache=cache)
    _assert_clean(model)
