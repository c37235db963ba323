"""How well SAE features line up with ground-truth patch masks (the organism knows every patch's object).

A feature "fires" on a patch when its activation is > 0. Against a property's mask (the patches that have
it), precision is the share of firing patches that have the property and recall the share of the
property's patches where it fires. Choose features on one set of items and measure them on another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Alignment:
    """Per-feature precision, recall and F1 of firing (> 0) against one property's patch mask."""

    precision: np.ndarray  # [d_sae]
    recall: np.ndarray
    f1: np.ndarray
    n_patches: int  # patches with the property

    @property
    def best(self) -> int:
        """The feature with the highest F1."""
        return int(np.argmax(self.f1))


def alignment(scan: torch.Tensor, mask: Any) -> Alignment:
    """Alignment of every feature of ``scan`` (``scan_patches``: [n_items, rows, cols, d_sae]) with a
    bool ``mask`` [n_items, rows, cols]."""
    fires = (scan > 0).reshape(-1, scan.shape[-1]).numpy()
    truth = np.asarray(mask, dtype=bool).reshape(-1)
    if truth.shape[0] != fires.shape[0]:
        raise ValueError(f"mask has {truth.shape[0]} patches but the scan has {fires.shape[0]}; give one bool per "
                         "patch of each scanned item, as [n_items, rows, cols].")
    hits = (fires & truth[:, None]).sum(0)
    precision = hits / np.maximum(fires.sum(0), 1)
    recall = hits / max(int(truth.sum()), 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return Alignment(precision, recall, f1, int(truth.sum()))


def organism_property_masks(items: Sequence[Any]) -> dict[str, np.ndarray]:
    """Bool masks [n_items, rows, cols] of the organism's patch-level ground truth: each shape and each colour
    that occurs in ``items``, ``"object"`` (any object), ``"background"`` and ``"target"`` (the object the
    question asks about)."""
    shapes = sorted({o.shape for it in items for o in it.objects})
    colours = sorted({o.colour for it in items for o in it.objects})

    def union(item: Any, keep: Any) -> np.ndarray:
        masks = [np.asarray(o.patch_mask, dtype=bool) for o in item.objects if keep(o)]
        return np.any(masks, axis=0) if masks else np.zeros_like(np.asarray(item.target_mask, dtype=bool))

    out = {name: np.stack([union(it, lambda o, n=name: o.shape == n) for it in items]) for name in shapes}
    out |= {name: np.stack([union(it, lambda o, n=name: o.colour == n) for it in items]) for name in colours}
    out["object"] = np.stack([union(it, lambda o: True) for it in items])
    out["background"] = ~out["object"]
    out["target"] = np.stack([np.asarray(it.target_mask, dtype=bool) for it in items])
    return out
