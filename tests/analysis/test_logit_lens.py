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
