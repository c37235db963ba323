"""The analysis tools recover what is known to be true of the shipped model organism."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lens import analysis, organism

N_ITEMS = 96
# Each organism object is drawn inside one 16-px cell, which is exactly one patch, so its patch mask is
# exact and has no spill-over into neighbours: the one-cell buffer of Neo et al. (added for real photos,
# where objects straddle patches) would cover most of the 3x3 grid here, other objects included.
BUFFER = 0


@pytest.fixture(scope="module")
def model():
    if not (organism.path() / "config.json").exists():
        pytest.fail("the model organism's weights are missing from vlm_lens/organism/weights")
    return organism.load()


@pytest.fixture(scope="module")
def items():
    data = organism.ShapesDataset(split="test", seed=11, size=3 * N_ITEMS)
    return [it for it in data if it.target_mask.any()][:N_ITEMS]


@pytest.fixture(scope="module")
def mean(model):
    data = list(organism.ShapesDataset(split="test", seed=12, size=96))
    inputs = model.prepare([it.prompt for it in data], images=[[it.image] for it in data])
    return analysis.mean_visual_token(model, inputs)


def _object(inputs, batch, buffer):
    return [analysis.object_positions(inputs.layout, b, it.target_mask, buffer=buffer) for b, it in enumerate(batch)]


def _background(inputs, batch, buffer):
    """Random cells away from every object, as many as the object selection has."""
    out = []
    for b, it in enumerate(batch):
        occupied = np.any([obj.patch_mask for obj in it.objects], axis=0)
        n = len(analysis.object_positions(inputs.layout, b, it.target_mask, buffer=buffer))
        out.append(analysis.background_positions(inputs.layout, b, n, occupied, seed=b))
    return out


def _accuracies(model, items, hooks):
    """Accuracy without hooks, with ``hooks(_object)`` and with ``hooks(_background)``."""
    return tuple(analysis.evaluate(model, items, hooks=h).accuracy for h in (None, hooks(_object), hooks(_background)))


def test_ablating_the_object_tokens_removes_the_answer(model, items, mean):
    def hooks(select):
        return lambda inputs, batch: analysis.image_ablation_hooks(inputs, select(inputs, batch, BUFFER), "mean",
                                                                   mean=mean)

    base, obj, rand = _accuracies(model, items, hooks)
    print(f"ablation: baseline {base:.3f}, object {obj:.3f}, random background {rand:.3f}")
    assert base - obj >= 0.5
    assert base - rand <= 0.1


def test_knocking_out_answer_to_object_attention(model, items):
    def hooks(select):
        def make(inputs, batch):
            last = inputs.tokens.shape[1] - 1
            return analysis.knockout_hooks([last], select(inputs, batch, 0), "all", n_layers=model.cfg.n_layers)
        return make

    base, obj, rand = _accuracies(model, items, hooks)
    print(f"knockout: baseline {base:.3f}, answer->object {obj:.3f}, answer->background {rand:.3f}")
    assert base - obj >= 0.3
    assert base - rand <= 0.1


def _recoloured(item):
    obj = next(o for o in item.objects if o.colour == item.answer)
    other = next(c for c in organism.data.COLOURS if c not in {o.colour for o in item.objects})
    pixels = np.array(item.image)
    pixels[obj.pixel_mask] = organism.data.COLOURS[other]
    return Image.fromarray(pixels), obj, other


def test_patching_resid_pre_localises_the_changed_object(model):
    data = organism.ShapesDataset(split="test", seed=13, size=80)
    items = [it for it in data if it.question_type == "colour_of_shape"][:6]
    fractions = []
    for item in items:
        corrupt_image, obj, other = _recoloured(item)
        clean = model.prepare(item.prompt, images=[item.image])
        corrupt = model.prepare(item.prompt, images=[corrupt_image])
        tok = model.tokenizer
        right = analysis.answer_token(tok, item.answer)
        wrong = analysis.answer_token(tok, other)
        result = analysis.patch_image_positions(model, clean, corrupt, analysis.logit_diff_metric(right, wrong),
                                                layers=[0])
        with torch.no_grad():
            baseline = analysis.logit_diff_metric(right, wrong)(model(corrupt))
        effect = (result.values[0] - baseline).abs()
        fractions.append(float(effect[torch.as_tensor(obj.patch_mask)].sum() / effect.sum()))
    print("share of the layer-0 patching effect on the changed object's patches:", [round(f, 3) for f in fractions])
    assert np.mean(fractions) >= 0.8


def test_logit_lens_runs_on_object_patches(model, items):
    hits = []
    for item in items[:16]:
        inputs = model.prepare(item.prompt, images=[item.image])
        target = next(o for o in item.objects if o.patch_mask[item.target_mask].any())
        lens = analysis.logit_lens(model, inputs, k=5)
        hits.append(analysis.hit_rate(lens, model.tokenizer, [target.colour, target.shape], k=5, image=0,
                                      mask=torch.as_tensor(target.patch_mask)))
    rate = torch.stack(hits).mean(0)
    print("logit-lens top-5 hit rate on object patches per layer:", [round(float(r), 3) for r in rate])
    assert rate.shape == (model.cfg.n_layers,) and torch.all((rate >= 0) & (rate <= 1))
