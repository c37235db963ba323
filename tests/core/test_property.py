"""Property test over configurations: random tiny checkpoints of every registered family equal Hugging Face,
and a bad input leaves the model clean.

Each family's ``vlm_lens/architectures/<family>/testing.py`` supplies ``case_strategy()``, a hypothesis
strategy of ``vlm_lens.testing.Case`` (config, prompts, images, padding side, dtype), so a new family is
covered by adding its folder; a registered family without one fails here. The example budget is fixed
and derandomized, so CI runs the same few cases every time, in well under a minute.
"""

import importlib
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from vlm_lens import HookedVLM
from vlm_lens.architectures.registry import ArchitectureSpec, all_specs
from vlm_lens.context import CALL

ATOL = 1e-4  # float32, as every parity test
# Per family, ~0.5 s each on one CPU thread, the same every run. VLM_LENS_PROPERTY_EXAMPLES=200 explores:
# that many fresh random draws per family.
EXPLORE = os.environ.get("VLM_LENS_PROPERTY_EXAMPLES")
EXAMPLES = int(EXPLORE or 8)
TEXT_TOKEN = 8  # "what" in the test tokenizers: any non-image token


def case_strategy(spec: ArchitectureSpec):
    """The family's ``testing.case_strategy()``, or a failure that says what to add."""
    where, package = f"vlm_lens/architectures/{spec.family}/testing.py", f"vlm_lens.architectures.{spec.family}"
    try:
        module = importlib.import_module(f"{package}.testing")
    except ModuleNotFoundError as err:
        if err.name not in (package, f"{package}.testing"):  # a missing dependency of testing.py: show it
            raise
        module = None
    if getattr(module, "case_strategy", None) is None:
        pytest.fail(f"{spec.name} is registered by vlm_lens/architectures/{spec.family}/ but {where} has no "
                    "case_strategy(): add one returning a hypothesis strategy of vlm_lens.testing.Case (see "
                    "vlm_lens/architectures/llava/testing.py), so the property test covers the family.")
    return module.case_strategy()


@pytest.mark.parametrize("spec", all_specs(), ids=lambda spec: spec.family)
def test_random_configs_match_hf_and_survive_bad_inputs(spec):
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=EXPLORE is None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=case_strategy(spec))
    def check(case):
        with tempfile.TemporaryDirectory() as folder:
            path, hf = case.save(Path(folder))
            model = HookedVLM.from_pretrained_no_processing(str(path), dtype=case.dtype)
            inputs = model.prepare(list(case.prompts), images=case.images(), padding_side=case.padding_side)
            with torch.no_grad():
                logits = model(inputs)
            assert_matches_hf(logits, hf, case, inputs)
            assert_clean_after_bad_inputs(model, inputs, logits, case)

    check()


def test_a_family_without_a_strategy_fails_clearly():
    spec = replace(all_specs()[0], name="NewFamilyForConditionalGeneration", family="new_family")
    with pytest.raises(pytest.fail.Exception, match=r"new_family/testing\.py has no case_strategy\(\)"):
        case_strategy(spec)


# ----------------------------------------------------------------------------------- parity
def assert_matches_hf(logits, hf, case, inputs):
    """float32: logits within ATOL at real positions. bfloat16: against HF's float32 logits, no further
    than HF's own bfloat16 run is (see ``bf16_bound``), and the same greedy token wherever that bound
    cannot flip it."""
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        ref = case.reference_logits(hf, inputs)[real]
    ours = logits[real]
    if case.dtype == torch.float32:
        diff = (ours - ref).abs().max().item()
        assert diff <= ATOL, f"max |logit - HF| = {diff:.2e} at real positions (float32, atol {ATOL})"
        return
    with torch.no_grad():
        hf_low = case.reference_logits(hf.to(case.dtype), inputs)[real]
    ref, ours, hf_low = (x.float().log_softmax(-1) for x in (ref, ours, hf_low))
    noise = (hf_low - ref).abs().max().item()
    bound = bf16_bound(noise)
    diff = (ours - ref).abs().max().item()
    assert diff <= bound, (f"bfloat16: max |log p - HF float32| = {diff:.4f} > {bound:.4f} (HF's own bfloat16 "
                           f"run is {noise:.4f} away)")
    top2 = ref.topk(2, dim=-1)
    decided = top2.values[:, 0] - top2.values[:, 1] > 2 * bound
    assert decided.any(), "no position has a clear greedy token; the drawn model is too flat to test"
    for name, low in (("ours", ours), ("HF bfloat16", hf_low)):
        flipped = (low.argmax(-1) != top2.indices[:, 0]) & decided
        assert not flipped.any(), f"{name}: greedy token differs from HF float32 at {int(flipped.sum())} positions"


def bf16_bound(noise: float) -> float:
    """How far (max |log-prob| difference) our bfloat16 logits may be from HF's float32 ones.

    bfloat16 keeps 8 significant bits (~2.4 decimal digits), so these tiny models' log-probs (spread ~0.5)
    move by ~1e-2 when the whole forward pass runs in it. Measured over 60 drawn bfloat16 cases (15 per
    family): HF's own bfloat16 run is 0.011-0.034 from its float32 one (``noise``), ours 0.6-1.6x as far,
    as rounding falls in other places; the same prompts with other images move the log-probs by 0.8-3.3.
    So 2x HF's own error (+0.01 for a draw where HF's rounding happens to cancel) passes every correct
    run with room, and fails a model whose projector weights are 20% off every time (5% off: a third of
    the time; 2%: never, that is within rounding). Bugs that small are the float32 examples' job.
    """
    return 2 * noise + 0.01


# ----------------------------------------------------------------------------------- bad inputs
def _without_last_image_tokens(inputs, case):
    """One image's tokens become text: one image too many for the placeholders."""
    row, start, end = case.last_image_positions(inputs)
    tokens = inputs.tokens.clone()
    tokens[row, start:end] = TEXT_TOKEN
    return replace(inputs, tokens=tokens)


BAD_INPUTS = {  # what -> (make it from good inputs and the case, what the ValueError says)
    "pixel_values of the wrong shape": (lambda inputs, case: replace(inputs, pixel_values=inputs.pixel_values[..., :-1]),
                                        "pixel_values has shape"),
    "image tokens without pixel_values": (lambda inputs, case: replace(inputs, pixel_values=None), "no pixel_values"),
    "one image too many for the image tokens": (_without_last_image_tokens, "image token"),
}


def hooks_left(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items()
            if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks or hp._backward_hooks]


def assert_clean_after_bad_inputs(model, inputs, logits, case):
    """Each bad call raises a ValueError before anything runs, leaves no hook and no call state behind,
    and the next good call gives bit-identical logits."""
    for what, (make_bad, says) in BAD_INPUTS.items():
        bad, fired = make_bad(inputs, case), []
        hooks = [(name, lambda value, hook: fired.append(hook.name)) for name in ("hook_embed", "hook_image_features")]
        with pytest.raises(ValueError, match=says):
            model.run_with_hooks(bad, fwd_hooks=hooks)
        with pytest.raises(ValueError, match=says):
            model.run_with_cache(bad)
        assert not fired, f"{what}: hooks fired before the ValueError: {fired}"
        assert not hooks_left(model), f"{what}: hooks left attached: {hooks_left(model)}"
        assert CALL.get() is None, f"{what}: call state left bound"
        with torch.no_grad():
            assert torch.equal(model(inputs), logits), f"{what}: the next good call's logits changed"
