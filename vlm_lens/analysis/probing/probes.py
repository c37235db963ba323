"""Zero- and few-shot perception probes on token features (Liu et al., 2025).

Every probe takes features stacked over layers, [n_layers, n_images, rows, cols, dim] (e.g.
``readout.stack("v")``; a single layer is ``x[None]``), and returns one score per layer.
Masks are bool [n_images, rows, cols] on the token grid, or in pixels for scoring (predictions are
then up-sampled with nearest neighbours).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from vlm_lens.analysis.probing.fit import fit_logistic, kmeans
from vlm_lens.analysis.probing.metrics import iou_per_image, miou, pck

Features = Float[torch.Tensor, "n_layers n_images rows cols dim"]


def _check(features: torch.Tensor, masks: torch.Tensor, what: str = "masks", on_grid: bool = False) -> None:
    if features.ndim != 5:
        raise ValueError(f"features must be [n_layers, n_images, rows, cols, dim], got shape {tuple(features.shape)}; "
                         "use readout.stack(site), or x[None] for a single layer.")
    if masks.shape[0] != features.shape[1]:
        raise ValueError(f"{masks.shape[0]} {what} for {features.shape[1]} images; give one mask per image.")
    if on_grid and masks.shape[1:] != features.shape[2:4]:
        raise ValueError(f"{what} have shape {tuple(masks.shape[1:])} but the token grid is {tuple(features.shape[2:4])}; "
                         "give masks on the token grid (e.g. item.objects[i].patch_mask).")


def _layers(n: int, progress: bool, desc: str) -> Iterable[int]:
    return tqdm(range(n), disable=not progress, desc=desc)


def linear_probe_segmentation(features: Features, masks: Bool[torch.Tensor, "n_images rows cols"], *, n_train: int,
                              eval_masks: Bool[torch.Tensor, "n_images h w"] | None = None,
                              weight_decay: float = 1e-2, shuffle_labels: bool = False, seed: int = 0,
                              progress: bool = False) -> Float[torch.Tensor, " n_layers"]:
    """Few-shot foreground segmentation: a logistic probe on each token, trained on the first
    ``n_train`` images, scored by foreground/background mIoU on the rest.

    ``shuffle_labels=True`` trains on labels permuted across the training tokens: the chance
    baseline. ``eval_masks`` (e.g. pixel masks) replaces ``masks`` for scoring.

    Example:
        >>> scores = linear_probe_segmentation(readout.stack("v"), masks, n_train=4)  # 8 images
        >>> scores.shape  # one mIoU per layer
        torch.Size([4])
    """
    _check(features, masks, on_grid=True)
    n_images = features.shape[1]
    if not 1 <= n_train < n_images:
        raise ValueError(f"n_train must be between 1 and n_images - 1 = {n_images - 1}, got {n_train}.")
    labels = masks[:n_train].reshape(-1).long()
    if labels.min() == labels.max():
        raise ValueError("the training images' masks are all one class; include images with foreground and background.")
    if shuffle_labels:
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    targets = (masks if eval_masks is None else eval_masks)[n_train:]
    _check(features, masks if eval_masks is None else eval_masks, "eval_masks")
    dim, grid = features.shape[-1], masks.shape[1:]
    scores = []
    for layer in _layers(len(features), progress, "linear probe"):
        probe = fit_logistic(features[layer, :n_train].reshape(-1, dim), labels, n_classes=2, weight_decay=weight_decay)
        pred = probe.predict(features[layer, n_train:].reshape(-1, dim)).reshape(-1, *grid).bool()
        scores.append(miou(pred, targets))
    return torch.tensor(scores)


def similarity_maps(features: Float[torch.Tensor, "n_images rows cols dim"], queries: Float[torch.Tensor, "n_images dim"],
                    metric: Literal["dot", "cosine"] = "cosine") -> Float[torch.Tensor, "n_images rows cols"]:
    """Each image's token features scored against its own query vector."""
    if metric not in ("dot", "cosine"):
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}.")
    x, q = features.float(), queries.float()
    if metric == "cosine":
        x, q = F.normalize(x, dim=-1), F.normalize(q, dim=-1)
    return torch.einsum("nrcd,nd->nrc", x, q)


def query_segmentation(features: Features, queries: Float[torch.Tensor, "n_layers n_queries dim"],
                       masks: Bool[torch.Tensor, "n_images h w"], *, query_index: Int[torch.Tensor, " n_images"] | None = None,
                       threshold: float = 0.5, metric: Literal["dot", "cosine"] = "cosine") -> Float[torch.Tensor, " n_layers"]:
    """Zero-shot segmentation by similarity with a text query's key or value (``text_features``).

    Image ``i`` uses query ``query_index[i]`` (default: the only query, or query ``i``). Each
    similarity map is min-max normalised per image and thresholded at ``threshold``; mIoU per layer.

    Example:
        >>> from vlm_lens.analysis.probing import text_features
        >>> q = text_features(model, ["red circle"], sites=("v",)).stack("v")
        >>> query_segmentation(readout.stack("v"), q, masks).shape  # one mIoU per layer
        torch.Size([4])
    """
    _check(features, masks)
    n_layers, n_images = features.shape[:2]
    if queries.shape[0] != n_layers:
        raise ValueError(f"queries have {queries.shape[0]} layers but features {n_layers}; read both at the same layers.")
    if query_index is None:
        if queries.shape[1] not in (1, n_images):
            raise ValueError(f"{queries.shape[1]} queries for {n_images} images: pass query_index=[...] per image.")
        query_index = torch.zeros(n_images, dtype=torch.long) if queries.shape[1] == 1 else torch.arange(n_images)
    if len(query_index) != n_images or int(query_index.max()) >= queries.shape[1] or int(query_index.min()) < 0:
        raise ValueError(f"query_index needs one entry in [0, {queries.shape[1]}) per image ({n_images}).")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold applies to min-max normalised maps and must be in (0, 1), got {threshold}.")
    scores = []
    for layer in range(n_layers):
        sim = similarity_maps(features[layer], queries[layer, query_index], metric)
        lo = sim.flatten(1).min(1).values[:, None, None]
        hi = sim.flatten(1).max(1).values[:, None, None]
        scores.append(miou((sim - lo) / (hi - lo).clamp(min=1e-12) >= threshold, masks))
    return torch.tensor(scores)


def nearest_patches(source: Float[torch.Tensor, "n_images rows cols dim"], target: Float[torch.Tensor, "n_images rows2 cols2 dim"],
                    points: Int[torch.Tensor, "n_images k 2"]) -> Int[torch.Tensor, "n_images k 2"]:
    """For each (row, col) point in a source image, the (row, col) of the most cosine-similar target patch."""
    cols = target.shape[2]
    tgt = F.normalize(target.float().flatten(1, 2), dim=-1)  # [n, r2*c2, d]
    n = torch.arange(len(points))[:, None]
    query = F.normalize(source.float()[n, points[..., 0], points[..., 1]], dim=-1)  # [n, k, d]
    best = torch.einsum("nkd,npd->nkp", query, tgt).argmax(-1)
    return torch.stack([best // cols, best % cols], dim=-1)


def correspondence_pck(source: Features, target: Float[torch.Tensor, "n_layers n_images rows2 cols2 dim"],
                       source_points: Int[torch.Tensor, "n_images k 2"], target_points: Int[torch.Tensor, "n_images k 2"], *,
                       valid: Bool[torch.Tensor, "n_images k"] | None = None,
                       threshold: float = 1.0) -> Float[torch.Tensor, " n_layers"]:
    """Semantic correspondence: PCK of nearest-neighbour matches from source to target image pairs.

    A source keypoint (row, col) is correct when its most similar target patch lies within
    ``threshold`` grid cells of the true target point. ``keypoints_from_masks`` builds points for
    an object that moved; identical images give PCK 1.
    """
    _check(source, source_points, "source point sets")
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(f"source {tuple(source.shape[:2])} and target {tuple(target.shape[:2])} need the same "
                         "[n_layers, n_images]: one target per source image.")
    rows, cols = source.shape[2:4]
    if (source_points < 0).any() or (source_points[..., 0] >= rows).any() or (source_points[..., 1] >= cols).any():
        raise ValueError(f"source points must be (row, col) cells inside the {rows}x{cols} grid.")
    return torch.tensor([pck(nearest_patches(source[layer], target[layer], source_points), target_points,
                             threshold=threshold, valid=valid) for layer in range(len(source))])


def cosegmentation(features: Features, masks: Bool[torch.Tensor, "n_images h w"], *, k: int = 2, n_init: int = 4,
                   normalize: bool = True, seed: int = 0, progress: bool = False) -> Float[torch.Tensor, " n_layers"]:
    """Co-segmentation: k-means over the tokens of all images jointly; per layer, the mIoU of the
    best-matching cluster taken as foreground. ``normalize`` clusters unit-length features."""
    _check(features, masks)
    n_images, rows, cols, dim = features.shape[1:]
    scores = []
    for layer in _layers(len(features), progress, "co-segmentation"):
        x = features[layer].reshape(-1, dim).float()
        labels, _ = kmeans(F.normalize(x, dim=-1) if normalize else x, k, n_init=n_init, seed=seed)
        labels = labels.reshape(n_images, rows, cols)
        scores.append(max(miou(labels == j, masks) for j in range(k)))
    return torch.tensor(scores)


def propagate_labels(source: Float[torch.Tensor, "n_images rows cols dim"], target: Float[torch.Tensor, "n_images rows2 cols2 dim"],
                     source_masks: Bool[torch.Tensor, "n_images rows cols"], k: int = 1
                     ) -> Bool[torch.Tensor, "n_images rows2 cols2"]:
    """Each target patch takes the majority label of its ``k`` most cosine-similar source patches."""
    src = F.normalize(source.float().flatten(1, 2), dim=-1)
    tgt = F.normalize(target.float().flatten(1, 2), dim=-1)
    if not 1 <= k <= src.shape[1]:
        raise ValueError(f"k must be between 1 and the {src.shape[1]} source patches, got {k}.")
    idx = torch.einsum("nqd,npd->nqp", tgt, src).topk(k, dim=-1).indices  # [n, r2*c2, k]
    labels = source_masks.flatten(1).float()
    votes = torch.gather(labels[:, None].expand(-1, idx.shape[1], -1), 2, idx).mean(-1)
    return (votes > 0.5).reshape(target.shape[:3])


def label_propagation(source: Features, target: Float[torch.Tensor, "n_layers n_images rows2 cols2 dim"],
                      source_masks: Bool[torch.Tensor, "n_images rows cols"], target_masks: Bool[torch.Tensor, "n_images h w"],
                      *, k: int = 1) -> Float[torch.Tensor, " n_layers"]:
    """Temporal correspondence: propagate frame A's patch mask to frame B by nearest neighbours
    (``propagate_labels``) and score the result against B's mask (mIoU). Identical frames give 1."""
    _check(source, source_masks, "source masks", on_grid=True)
    _check(target, target_masks, "target masks")
    if target.shape[:2] != source.shape[:2]:
        raise ValueError("source and target frames need the same [n_layers, n_images]; pair every frame A with a B.")
    return torch.tensor([float(iou_per_image(propagate_labels(source[layer], target[layer], source_masks, k),
                                             target_masks).mean()) for layer in range(len(source))])
