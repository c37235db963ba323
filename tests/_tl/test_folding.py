"""In-place weight processing (``vlm_lens._tl.folding``) against TransformerLens's own ``ProcessWeights``, for
every language model the families convert, in float32 and bfloat16; and the cases where writing in place
would be wrong (the caller's model, tied embeddings)."""

import copy
import re

import pytest
import torch
from transformer_lens import HookedTransformerConfig
from transformer_lens.weight_processing import ProcessWeights

from vlm_lens import HookedVLM
from vlm_lens._tl.processing import process_group, require_supported
from vlm_lens.architectures import get_spec
from vlm_lens.architectures.registry import architecture_of
from vlm_lens.loading.weights import FOLDED_NORMS, LM_PREFIXES, lm_groups, shared_memory_keys
from vlm_lens.testing import image_prompt_tokens, random_pixels

STEPS = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
# The weights that read a folded norm (a cross-attention block's queries read no folded norm).
READERS = re.compile(r"\.attn\._?W_[QKV]$|mlp\.W_(in|gate)$|unembed\.W_U$")


def _llava(lm: str, **overrides):
    from vlm_lens.architectures.llava.testing import make_hf_llava, tiny_llava_config

    return make_hf_llava(tiny_llava_config(lm, **overrides), seed=1)


def _family(name: str):
    from importlib import import_module

    module = import_module(f"vlm_lens.architectures.{name}.testing")
    configs = {
        "gemma3": "tiny_gemma3_config",
        "mllama": "tiny_mllama_config",
        "qwen2_5_vl": "tiny_qwen_config",
        "qwen2_vl": "tiny_qwen2_vl_config",
        "qwen3_vl": "tiny_qwen3_config",
        "internvl": "tiny_config",
        "pixtral": "tiny_mistral3_config",
        "idefics3": "tiny_config",
    }
    if name == "paligemma":
        return lambda version: module.make_hf(module.tiny_paligemma_config(version), seed=1)
    return lambda: module.make_hf(getattr(module, configs[name])(), seed=1)


# One model per language model the families convert (and the layouts around it: GQA, value biases, Gemma's
# offset norms and post-norms, Qwen3's qk-norm, Mllama's cross-attention blocks, InternVL's layer scale).
MODELS = {
    "llama": lambda: _llava("llama"),
    "mistral": lambda: _llava("mistral"),
    "qwen2 (value biases)": lambda: _llava("qwen2"),
    "gemma (paligemma)": lambda: _family("paligemma")(1),
    "gemma2 (paligemma 2)": lambda: _family("paligemma")(2),
    "gemma3": lambda: _family("gemma3")(),
    "mllama (cross-attention)": lambda: _family("mllama")(),
    "qwen2 (qwen2_vl)": lambda: _family("qwen2_vl")(),
    "qwen2 (qwen2_5_vl)": lambda: _family("qwen2_5_vl")(),
    "qwen3": lambda: _family("qwen3_vl")(),
    "qwen2 (internvl)": lambda: _family("internvl")(),
    "mistral (pixtral)": lambda: _family("pixtral")(),
    "llama (idefics3)": lambda: _family("idefics3")(),
}


def _lm_state(hf, dtype):
    hf = hf.to(dtype)
    spec = get_spec(architecture_of(hf.config) or type(hf).__name__)
    cfg, vlm_cfg = spec.build_configs(hf.config, dtype, "cpu")
    with torch.no_grad():
        state = {
            k: v.detach()
            for k, v in spec.convert_weights(hf, cfg, vlm_cfg).items()
            if k.startswith(LM_PREFIXES)
        }
    return state, cfg


def _process_in_groups(state, cfg):
    out = {}
    copy_first = shared_memory_keys(state)
    with torch.no_grad():
        for name, keys in lm_groups(list(state)):
            out.update(process_group(name, {k: state[k] for k in keys}, cfg, STEPS, copy_first))
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place of a's dtype (bf16: 2^-8 of the magnitude)."""
    spacing = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs())
    return (a.float() - b.float()).abs() / spacing.clamp_min(torch.finfo(a.dtype).tiny)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", list(MODELS))
def test_in_place_processing_equals_transformer_lens(model, dtype):
    state, cfg = _lm_state(MODELS[model](), dtype)
    require_supported(cfg)
    original = {k: v.clone() for k, v in state.items()}
    reference = ProcessWeights.process_weights(dict(original), copy.copy(cfg), **STEPS)
    ours = _process_in_groups(state, cfg)  # writes into `state`'s tensors
    folded = {k for k in reference if k.endswith(FOLDED_NORMS)}
    assert folded and all(torch.all(reference[k] == 1) for k in folded)  # what is dropped is the identity
    assert set(ours) == set(reference) - folded
    for key, value in ours.items():
        expected = reference[key]
        assert value.shape == expected.shape and value.dtype == expected.dtype, key
        if dtype == torch.float32:
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0, msg=key)
        elif READERS.search(key) and not key.endswith("W_U"):
            assert torch.equal(value, expected), key  # one product, one rounding: bit for bit
        else:  # sums in another order (means, value biases): at most one rounding step apart
            assert _ulps(value, expected).max() <= 1, key
    # Processing happened: each norm's readers changed (and nothing else that should not).
    readers = [k for k in ours if READERS.search(k)]
    assert all(not torch.equal(ours[k], original[k]) for k in readers)
    untouched = [k for k in ours if re.search(r"W_O$|W_out$|W_E$", k)]
    assert untouched and all(torch.equal(ours[k], original[k]) for k in untouched)


def test_value_biases_really_fold():
    """Qwen2 has value biases: they move into b_O and b_V becomes zero."""
    state, cfg = _lm_state(MODELS["qwen2 (value biases)"](), torch.float32)
    b_v = state["blocks.0.attn._b_V"].clone()
    b_o = state["blocks.0.attn.b_O"].clone()
    ours = _process_in_groups(state, cfg)
    assert b_v.abs().sum() > 0 and not torch.any(ours["blocks.0.attn._b_V"])
    assert not torch.allclose(ours["blocks.0.attn.b_O"], b_o)


def test_tied_embeddings_are_copied_before_writing(tmp_path):
    """W_U of a tied model is W_E's memory: folding into it must not change the embedding."""
    hf = _llava("llama", tie_word_embeddings=True)
    hf.config.text_config.tie_word_embeddings = True
    hf.tie_weights()
    state, cfg = _lm_state(hf, torch.float32)
    assert state["unembed.W_U"].data_ptr() == state["embed.W_E"].data_ptr()
    assert {"unembed.W_U", "embed.W_E"} <= shared_memory_keys(state)
    w_e = state["embed.W_E"].clone()
    ours = _process_in_groups(state, cfg)
    assert torch.equal(ours["embed.W_E"], w_e) and not torch.equal(ours["unembed.W_U"], w_e.T)
    # and through the loader, from a saved checkpoint
    hf.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path))
    tokens, pixels = image_prompt_tokens(16), random_pixels(1)
    with torch.no_grad():
        ours_lp = model(tokens, pixel_values=pixels).log_softmax(-1)
        ref_lp = hf.eval()(input_ids=tokens, pixel_values=pixels).logits.log_softmax(-1)
    assert (ours_lp - ref_lp).abs().max() <= 1e-4


def test_from_hf_leaves_the_callers_model_alone():
    hf = _llava("qwen2")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = HookedVLM.from_hf(hf, processing=True)
    after = hf.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    tokens, pixels = image_prompt_tokens(16), random_pixels(1)
    with torch.no_grad():
        diff = model(tokens, pixel_values=pixels).log_softmax(-1) - hf.eval()(
            input_ids=tokens, pixel_values=pixels
        ).logits.log_softmax(-1)
    assert diff.abs().max() <= 1e-4


def test_shared_memory_keys_compares_spans():
    fused = torch.randn(6, 4)
    state = {"q": fused[:2], "k": fused[2:4], "v": fused[4:], "e": torch.randn(3, 4)}
    assert shared_memory_keys(state) == set()  # rows of one fused weight: disjoint
    state.update(u=state["e"].T, col=fused[:, :2])
    assert shared_memory_keys(state) == {"e", "u", "q", "k", "v", "col"}


def test_layer_norm_models_are_refused():
    """LayerNorm processing (bias folding, centring) is not written: an error, not a wrong model."""
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=16,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=50,
        n_ctx=8,
        act_fn="gelu",
        normalization_type="LN",
    )
    with pytest.raises(ValueError, match="normalization_type='LN'.*from_pretrained_no_processing"):
        process_group("blocks.0.attn", {}, cfg, STEPS)


def test_square_mlp_folds_the_norm_into_its_d_model_rows():
    """With d_mlp == d_model, TransformerLens 3.9's fold guesses the layout from the shape and scales W_in's
    d_mlp columns instead (checked below); the in-place fold always scales the d_model rows."""
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        d_head=2,
        n_heads=4,
        d_mlp=8,
        d_vocab=10,
        n_ctx=4,
        act_fn="silu",
        normalization_type="RMS",
        gated_mlp=True,
    )
    torch.manual_seed(0)
    w_in, w_gate, ln2 = torch.randn(8, 8), torch.randn(8, 8), torch.rand(8) + 0.5
    state = {"blocks.0.ln2.w": ln2, "blocks.0.mlp.W_in": w_in.clone(), "blocks.0.mlp.W_gate": w_gate.clone()}
    tl = ProcessWeights.fold_layer_norm(dict(state), cfg, fold_biases=False, center_weights=False)
    assert torch.allclose(tl["blocks.0.mlp.W_in"], w_in * ln2[None, :])  # TransformerLens: the d_mlp axis
    ours = process_group("blocks.0.mlp", state, cfg, STEPS)
    assert set(ours) == {"blocks.0.mlp.W_in", "blocks.0.mlp.W_gate"}
    assert torch.equal(ours["blocks.0.mlp.W_in"], w_in * ln2[:, None])
    assert torch.equal(ours["blocks.0.mlp.W_gate"], w_gate * ln2[:, None])
