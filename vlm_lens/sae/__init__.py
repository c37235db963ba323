"""Sparse autoencoders on VLMs through SAE Lens (the optional extra: ``pip install vlm-lens[sae]``).

``HookedSAEVLM`` attaches SAE Lens SAEs at any hook (``add_sae``, ``reset_saes``, ``run_with_saes``,
``run_with_cache_with_saes``, the ``saes()`` context manager), optionally only at image or text tokens;
``feature_map`` / ``feature_heatmap`` / ``feature_page`` show a feature over the image; ``train_sae`` trains
one on image-token activations with SAE Lens's trainer; ``load_organism_sae`` is the SAE shipped for the
model organism. Nothing else in vlm_lens imports this package, so the core works without sae-lens.

Example:
    >>> from vlm_lens import organism
    >>> from vlm_lens.sae import HookedSAEVLM, load_organism_sae, feature_map
    >>> model = organism.load(model_class=HookedSAEVLM)
    >>> sae = load_organism_sae()
    >>> item = organism.ShapesDataset(split="test", seed=0, size=1)[0]
    >>> inputs = model.prepare(item.prompt, images=[item.image])
    >>> logits = model.run_with_saes(inputs, saes=[sae], positions="image")
    >>> feature_map(model, inputs, sae, feature=204).shape  # [rows, cols]; 204 is the triangle feature
    torch.Size([3, 3])
"""

import warnings

try:
    with warnings.catch_warnings():  # sae_lens imports TransformerLens's deprecated `utils` alias
        warnings.filterwarnings("ignore", message="The 'utils' module has been deprecated", category=DeprecationWarning)
        import sae_lens  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("vlm_lens.sae needs SAE Lens: pip install 'vlm-lens[sae]' (or pip install sae-lens).") from exc

from vlm_lens.sae.alignment import Alignment, alignment, organism_property_masks
from vlm_lens.sae.features import (
    PatchHit,
    feature_acts,
    feature_heatmap,
    feature_map,
    patch_grid,
    scan_patches,
    top_patches,
)
from vlm_lens.sae.hooked import HookedSAEVLM, Positions
from vlm_lens.sae.loading import ORGANISM_SAE, load_organism_sae, load_sae, organism_sae_path
from vlm_lens.sae.page import feature_page, patch_crop
from vlm_lens.sae.training import activation_batches, activation_rows, train_sae

__all__ = [
    "ORGANISM_SAE", "Alignment", "HookedSAEVLM", "PatchHit", "Positions", "activation_batches", "activation_rows",
    "alignment", "organism_property_masks",
    "feature_acts", "feature_heatmap", "feature_map", "feature_page", "load_organism_sae", "load_sae",
    "organism_sae_path", "patch_crop", "patch_grid", "scan_patches", "top_patches", "train_sae",
]
