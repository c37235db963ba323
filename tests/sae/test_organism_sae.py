"""The SAE shipped for the organism: SAE Lens's format, small, faithful, and with features that line up
with the ground truth on held-out items (test split; training used only the train split)."""

import json

import pytest
import torch

from vlm_lens import analysis, organism
from vlm_lens.sae import (
    ORGANISM_SAE,
    HookedSAEVLM,
    alignment,
    load_organism_sae,
    organism_property_masks,
    organism_sae_path,
    scan_patches,
)
from vlm_lens.sae.train_organism import MEASURE, SELECT


@pytest.fixture(scope="module")
def model():
    return organism.load(model_class=HookedSAEVLM)


@pytest.fixture(scope="module")
def sae():
    return load_organism_sae()


@pytest.fixture(scope="module")
def metrics():
    return json.loads((organism_sae_path() / "metrics.json").read_text())


@pytest.fixture(scope="module")
def measure_items():
    return list(organism.ShapesDataset(**MEASURE))


def test_shipped_in_sae_lens_format_and_small(sae):
    folder = organism_sae_path()
    assert {"cfg.json", "sae_weights.safetensors"} <= {p.name for p in folder.iterdir()}
    assert sum(p.stat().st_size for p in folder.iterdir()) < 5 * 2**20
    assert sae.cfg.metadata.hook_name == ORGANISM_SAE and sae.cfg.d_in == 128
    assert sae.cfg.normalize_activations == "none"  # the training scale is folded into the weights


def test_error_term_keeps_the_organism_exact(model, sae, measure_items):
    batch = measure_items[:32]
    inputs = model.prepare([it.prompt for it in batch], images=[[it.image] for it in batch])
    with torch.no_grad():
        clean = model(inputs)
        with model.saes([sae], use_error_term=True):
            kept, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_sae_acts_post"))
        spliced = model.run_with_saes(inputs, saes=[sae], positions="image")
    assert (kept - clean).abs().max() <= 1e-5
    assert cache[f"{ORGANISM_SAE}.hook_sae_acts_post"][inputs.image_mask].gt(0).sum(-1).le(sae.cfg.k).all()
    assert (spliced - clean).abs().max() > 1e-3
    assert not model.acts_to_saes


def test_reconstruction_keeps_accuracy_within_5_points(model, sae, measure_items, metrics):
    clean = analysis.evaluate(model, measure_items)
    with model.saes([sae], positions="image"):
        spliced = analysis.evaluate(model, measure_items)
    assert spliced.accuracy >= clean.accuracy - 0.05
    assert clean.accuracy == pytest.approx(metrics["accuracy"]["clean"], abs=1e-6)
    assert spliced.accuracy == pytest.approx(metrics["accuracy"]["sae_at_image_tokens"], abs=1e-6)


def test_best_feature_lines_up_with_ground_truth_on_held_out_items(model, sae, measure_items, metrics):
    # the features were chosen on SELECT items; here they are measured again on MEASURE items
    assert SELECT != MEASURE
    scan = scan_patches(model, sae, measure_items)
    masks = organism_property_masks(measure_items)
    for name, recorded in metrics["properties"].items():
        measured = alignment(scan, masks[name])
        assert measured.precision[recorded["feature"]] == pytest.approx(recorded["precision"], abs=1e-6), name
        assert measured.recall[recorded["feature"]] == pytest.approx(recorded["recall"], abs=1e-6), name
    objects = {k: v for k, v in metrics["properties"].items() if k not in ("object", "background", "target")}
    best = max(objects.values(), key=lambda p: p["f1"])  # the best colour or shape feature
    assert best["precision"] >= 0.75 and best["recall"] >= 0.75  # shipped: triangle, 0.806 / 0.881
