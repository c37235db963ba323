import pytest
import torch

from vlm_lens.analysis import hit_rate, logit_lens
from vlm_lens.analysis.logit_lens import LogitLensResult
from vlm_lens.testing import make_tokenizer


def test_last_layer_lens_equals_model_output(raw_model, two):
    result = logit_lens(raw_model, two, k=3)
    with torch.no_grad():
        logits = raw_model(two)
    for b in range(2):
        pos = result.positions[b]
        top = logits[b, pos].softmax(-1).topk(3)
        assert torch.equal(result.top_tokens[-1, b], top.indices)
        assert torch.allclose(result.top_probs[-1, b], top.values, atol=1e-5)
    tokens, probs = result.on_grid(1)
    assert tokens.shape == (raw_model.cfg.n_layers, 4, 4, 3)
    assert torch.equal(tokens[:, 2, 1], result.top_tokens[:, 1, 2 * 4 + 1])


def test_resid_pre_layer0_reads_the_embedding(raw_model, one):
    result = logit_lens(raw_model, one, stream="resid_pre", k=2, positions=torch.tensor([1, 2]))
    with torch.no_grad():
        _, cache = raw_model.run_with_cache(one, names_filter="hook_embed")
        ref = raw_model.unembed(raw_model.ln_final(cache["hook_embed"][:, [1, 2]])).softmax(-1).topk(2)
    assert torch.equal(result.top_tokens[0, 0], ref.indices[0])


def test_hit_rate_exact_and_prefix(one):
    tok = make_tokenizer()
    cat, the, dog = (tok.convert_tokens_to_ids(w) for w in ("cat", "the", "dog"))
    tokens = torch.tensor([[[[cat], [the], [dog], [the]]], [[[the], [the], [the], [the]]]])  # [2 layers, 1, 4, 1]
    result = LogitLensResult(["l0", "l1"], [torch.arange(4)], tokens, torch.ones(tokens.shape), one)
    assert hit_rate(result, tok, ["cat"]).tolist() == [0.25, 0.0]
    assert hit_rate(result, tok, ["cat", "dog"]).tolist() == [0.5, 0.0]
    assert hit_rate(result, tok, ["theatre"], match="prefix").tolist() == [0.5, 1.0]  # "the" is a fragment


def test_last_layer_lens_applies_the_logit_soft_cap(tmp_path):
    """PaliGemma 2 (Gemma 2) soft-caps its logits: the lens's last layer still reads the model's own output."""
    from vlm_lens import HookedVLM
    from vlm_lens.architectures.paligemma import testing as paligemma

    path, _ = paligemma.save_paligemma(tmp_path, paligemma.tiny_paligemma_config(version=2))
    model = HookedVLM.from_pretrained_no_processing(str(path))
    assert model.cfg.output_logits_soft_cap > 0
    inputs = model.prepare(paligemma.PROMPTS[0], images=[paligemma.seeded_image((16, 16), 0)])
    last = inputs.tokens.shape[1] - 1
    with torch.no_grad():
        own = model(inputs)[0, last].softmax(-1).topk(3)
    lens = logit_lens(model, inputs, positions=[last], k=3)
    assert torch.equal(lens.top_tokens[-1, 0, 0], own.indices)
    assert torch.allclose(lens.top_probs[-1, 0, 0], own.values, atol=1e-5)


def test_hit_rate_ignores_special_tokens_and_refuses_a_k_the_lens_lacks(one):
    """'Red' is unknown to the test tokenizer: its <unk> must not count as naming red."""
    tok = make_tokenizer()
    unk = torch.full((1, 1, 4, 1), tok.unk_token_id)
    result = LogitLensResult(["blocks.0.hook_resid_post"], [torch.arange(4)], unk, torch.ones(1, 1, 4, 1), one)
    assert hit_rate(result, tok, ["red"]).tolist() == [0.0]
    with pytest.raises(ValueError, match="k >= 5"):
        hit_rate(result, tok, ["red"], k=5)
