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
