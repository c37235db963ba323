import pytest
import torch

from vlm_lens.analysis import (
    image_token_attribution,
    logit_target,
    mean_visual_token,
    normalised,
    patch_image_positions,
    top_attributed_positions,
)
from vlm_lens.analysis.patching import logit_diff_metric

from .conftest import PROMPT, make_image


def test_integrated_gradients_completeness(raw_model, one):
    token = 7
    target = logit_target(token)
    mean = mean_visual_token(raw_model, one)
    ig = image_token_attribution(raw_model, one, target, method="integrated_gradients", baseline=mean, steps=32)
    with torch.no_grad():
        full = raw_model(one)[0, -1, token]
        base = raw_model.run_with_hooks(one, fwd_hooks=[("hook_image_embeds", lambda v, hook: mean.expand_as(v))])[0, -1, token]
    assert abs(ig.sum() - (full - base)) <= 0.05 * abs(full - base)
    gxi = image_token_attribution(raw_model, one, target)
    assert gxi.shape == (raw_model.vlm_cfg.n_image_tokens,)
    top = top_attributed_positions(one, gxi, 0, 3)
    assert len(top) == 3 and set(top.tolist()) <= set(one.layout.image_positions().tolist())


def test_patch_image_positions_on_the_grid(raw_model):
    clean = raw_model.prepare(PROMPT, images=[make_image(0)])
    corrupt = raw_model.prepare(PROMPT, images=[make_image(1)])
    with torch.no_grad():
        clean_logits, corrupt_logits = raw_model(clean), raw_model(corrupt)
    a, b = clean_logits[0, -1].topk(2).indices.tolist()
    metric = logit_diff_metric(a, b)
    norm = normalised(metric, float(metric(clean_logits)), float(metric(corrupt_logits)))
    self_patch = patch_image_positions(raw_model, clean, clean, norm, layers=[0])
    assert torch.allclose(self_patch.values, torch.ones(1, 4, 4), atol=1e-4)
    result = patch_image_positions(raw_model, clean, corrupt, norm)
    assert result.values.shape == (raw_model.cfg.n_layers, 4, 4)
    assert result.values.abs().max() > 0
    heads = patch_image_positions(raw_model, clean, corrupt, norm, activation="z", layers=[1])
    assert heads.values.shape == (1, 4, 4, raw_model.cfg.n_heads)


def test_patch_image_positions_patches_each_rows_own_cell_under_padding(raw_model, two):
    """Rows of different lengths put their images at different positions under left padding: cell (r, c) is
    patched at each row's own image, as a hand-written hook does."""
    corrupt = raw_model.prepare([PROMPT, "USER : <image>\ndescribe ASSISTANT :"],
                                images=[[make_image(3)], [make_image(4)]])
    starts = [int(two.layout.grid(i)[0, 0]) for i in range(2)]
    assert starts[0] != starts[1]  # the case this test is about
    with torch.no_grad():
        base = raw_model(corrupt)
    metric = lambda logits: (logits[:, -1] - base[:, -1]).norm(dim=-1).mean()  # noqa: E731
    name = "blocks.0.hook_resid_pre"
    _, cache = raw_model.run_with_cache(two, names_filter=name)
    result = patch_image_positions(raw_model, two, corrupt, metric, layers=[0])

    def by_hand(r, c):
        def hook(value, hook):
            value = value.clone()
            for image in range(2):
                b, p = two.layout.batch_of(image), int(two.layout.grid(image)[r, c])
                value[b, p] = cache[name][b, p]
            return value
        with torch.no_grad():
            return float(metric(raw_model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])))

    expected = torch.tensor([[by_hand(r, c) for c in range(4)] for r in range(4)])
    assert torch.allclose(result.values[0], expected, atol=1e-4), (result.values[0] - expected).abs().max()
    heads = patch_image_positions(raw_model, two, corrupt, metric, activation="z", layers=[0])
    assert heads.values.shape == (1, 4, 4, raw_model.cfg.n_heads) and heads.values.abs().max() > 0


def test_patch_image_positions_refuses_a_missing_image(raw_model, two):
    with pytest.raises(ValueError, match="has 1 image"):
        patch_image_positions(raw_model, two, two, lambda logits: logits.sum(), image=1, layers=[0])
    assert not any(h.fwd_hooks for h in raw_model.hook_dict.values())
