"""transformer_lens.patching works with VLMInputs and carries the images along."""

import numpy as np
import torch
from PIL import Image
from transformer_lens import patching


def img(seed, size=16):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


PROMPT = "USER : <image>\nwhat is this ? ASSISTANT :"


def make_metric(token):
    return lambda logits: logits[0, -1, token]


def test_patching_resid_pre_with_images(raw_model):
    clean = raw_model.prepare(PROMPT, images=[img(0)])
    corrupt = raw_model.prepare(PROMPT, images=[img(1)])
    with torch.no_grad():
        clean_logits, clean_cache = raw_model.run_with_cache(clean)
        corrupt_logits = raw_model(corrupt)
    token = int(clean_logits[0, -1].argmax())
    metric = make_metric(token)
    assert metric(clean_logits) != metric(corrupt_logits)  # the images matter

    # patching the clean cache into the clean run gives the clean metric everywhere
    same = patching.get_act_patch_resid_pre(raw_model, clean, clean_cache, metric)
    assert same.shape == (raw_model.cfg.n_layers, clean.tokens.shape[1])
    assert torch.allclose(same, metric(clean_logits).expand_as(same), atol=1e-5)

    # between two images the effect starts at the image positions
    effect = patching.get_act_patch_resid_pre(raw_model, corrupt, clean_cache, metric) - metric(corrupt_logits)
    first_image = int(clean.layout.image_positions().min())
    assert effect[:, :first_image].abs().max() < 1e-5
    assert effect[0, clean.layout.image_positions()].abs().max() > 1e-4


def test_patching_head_outputs_by_pos(raw_model):
    clean = raw_model.prepare(PROMPT, images=[img(0)])
    corrupt = raw_model.prepare(PROMPT, images=[img(1)])
    with torch.no_grad():
        clean_logits, clean_cache = raw_model.run_with_cache(clean)
    metric = make_metric(int(clean_logits[0, -1].argmax()))
    out = patching.get_act_patch_attn_head_out_by_pos(raw_model, corrupt, clean_cache, metric)
    assert out.shape == (raw_model.cfg.n_layers, clean.tokens.shape[1], raw_model.cfg.n_heads)
    assert torch.isfinite(out).all() and out.std() > 0
