"""Scores for the probes: foreground/background mIoU, PCK, and mask up-sampling to pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int


def upsample_mask(mask: Bool[torch.Tensor, "*batch rows cols"], size: tuple[int, int]
                  ) -> Bool[torch.Tensor, "*batch height width"]:
    """Nearest-neighbour up-sampling of token-grid masks to ``size`` = (height, width) pixels."""
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (height, width) with positive sides, got {size}.")
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    up = F.interpolate(flat, size=tuple(size), mode="nearest")
    return up.reshape(*lead, *size).bool()


def _match_size(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if pred.shape[-2:] == target.shape[-2:]:
        return pred
    if pred.shape[-2] > target.shape[-2] or pred.shape[-1] > target.shape[-1]:
        raise ValueError(f"prediction grid {tuple(pred.shape[-2:])} is finer than the target {tuple(target.shape[-2:])}; "
                         "give targets on the token grid or in pixels.")
    return upsample_mask(pred, tuple(target.shape[-2:]))


def iou_per_image(pred: Bool[torch.Tensor, "n_images h w"], target: Bool[torch.Tensor, "n_images h2 w2"]
                  ) -> Float[torch.Tensor, " n_images"]:
    """Per image, the mean of the foreground and background IoUs (a class absent from both counts 1).

    A token-grid ``pred`` is up-sampled (nearest) to the target's size when the target is in pixels.
    """
    if pred.shape[0] != target.shape[0]:
        raise ValueError(f"{pred.shape[0]} predicted masks for {target.shape[0]} targets; give one per image.")
    pred = _match_size(pred.bool(), target).flatten(1)
    target = target.bool().flatten(1)
    scores = []
    for p, t in ((pred, target), (~pred, ~target)):
        inter, union = (p & t).sum(1).float(), (p | t).sum(1).float()
        scores.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
    return (scores[0] + scores[1]) / 2


def miou(pred: Bool[torch.Tensor, "n_images h w"], target: Bool[torch.Tensor, "n_images h2 w2"]) -> float:
    """Foreground/background mIoU averaged over images; 1 for a perfect prediction.

    Example:
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool); m[0, :2] = True
        >>> miou(m, m)
        1.0
    """
    return float(iou_per_image(pred, target).mean())


def pck(predicted: Int[torch.Tensor, "n k 2"], true: Int[torch.Tensor, "n k 2"], *, threshold: float = 1.0,
        valid: Bool[torch.Tensor, "n k"] | None = None) -> float:
    """Percentage of correct keypoints: the fraction of valid points within ``threshold`` grid cells
    (Euclidean distance in (row, col)) of the true point."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 grid cells, got {threshold}.")
    if predicted.shape != true.shape:
        raise ValueError(f"predicted points {tuple(predicted.shape)} and true points {tuple(true.shape)} differ in shape.")
    ok = (predicted - true).float().norm(dim=-1) <= threshold + 1e-6
    valid = torch.ones_like(ok) if valid is None else valid.bool()
    if not valid.any():
        raise ValueError("no valid keypoint to score; check the valid mask.")
    return float(ok[valid].float().mean())


def keypoints_from_masks(source: Bool[torch.Tensor, "n rows cols"], target: Bool[torch.Tensor, "n rows cols"]
                         ) -> tuple[Int[torch.Tensor, "n k 2"], Int[torch.Tensor, "n k 2"], Bool[torch.Tensor, "n k"]]:
    """Keypoint pairs for an object that moved without changing shape: each source patch of the
    object and the patch it moved to. Returns (source points, target points, valid), padded to the
    largest object; ValueError when a target mask is not a translate of its source mask."""
    src_pts, tgt_pts = [], []
    for i, (a, b) in enumerate(zip(source.bool(), target.bool())):
        pa, pb = a.nonzero(), b.nonzero()
        if len(pa) == 0 or len(pa) != len(pb) or not torch.equal(pa - pa[0], pb - pb[0]):
            raise ValueError(f"pair {i}: the target mask is not the source mask moved; keypoints need the same "
                             "object shape in both images (same size and sub-cell offset).")
        src_pts.append(pa)
        tgt_pts.append(pb)
    k = max(len(p) for p in src_pts)
    out_src = torch.zeros(len(src_pts), k, 2, dtype=torch.long)
    out_tgt = torch.zeros_like(out_src)
    valid = torch.zeros(len(src_pts), k, dtype=torch.bool)
    for i, (pa, pb) in enumerate(zip(src_pts, tgt_pts)):
        out_src[i, :len(pa)], out_tgt[i, :len(pb)], valid[i, :len(pa)] = pa, pb, True
    return out_src, out_tgt, valid
