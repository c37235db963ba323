"""Probes and metrics on synthetic features whose answers are known."""

import pytest
import torch

from vlm_lens.analysis.probing import (
    correspondence_pck,
    cosegmentation,
    fit_logistic,
    iou_per_image,
    keypoints_from_masks,
    kmeans,
    label_propagation,
    linear_probe_segmentation,
    miou,
    pck,
    query_segmentation,
    upsample_mask,
)


def blob_masks(n, size=6, seed=0):
    """One random rectangle of foreground per image."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r, c = torch.randint(0, size - 2, (2,), generator=g).tolist()
        h, w = torch.randint(1, 3, (2,), generator=g).tolist()
        masks[i, r:r + h + 1, c:c + w + 1] = True
    return masks


def perfect_features(masks, dim=8, n_layers=2, noise=0.05, seed=0):
    """[L, n, r, c, dim]: dim 0 says foreground, the rest is noise (layer 1 adds a random rotation)."""
    g = torch.Generator().manual_seed(seed)
    x = noise * torch.randn(n_layers, *masks.shape, dim, generator=g)
    x[..., 0] += masks.float() * 2 - 1
    return x


def test_miou_perfect_empty_and_upsampled():
    masks = blob_masks(5)
    assert miou(masks, masks) == 1.0
    assert miou(~masks, masks) == 0.0
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert miou(empty, empty) == 1.0  # both classes absent-or-equal: perfect
    pixels = upsample_mask(masks, (24, 24))
    assert pixels.shape == (5, 24, 24) and torch.equal(pixels[:, ::4, ::4], masks)
    assert miou(masks, pixels) == 1.0  # token-grid prediction scored against pixel targets
    truth = torch.tensor([[[True, True], [False, False]]])
    pred = torch.tensor([[[True, False], [False, False]]])
    assert iou_per_image(pred, truth)[0] == pytest.approx((1 / 2 + 2 / 3) / 2)  # foreground 1/2, background 2/3
    with pytest.raises(ValueError, match="finer"):
        miou(pixels, masks)


def test_linear_probe_perfect_vs_shuffled():
    masks = blob_masks(24, seed=1)
    feats = perfect_features(masks)
    scores = linear_probe_segmentation(feats, masks, n_train=12)
    assert scores.shape == (2,) and torch.allclose(scores, torch.ones(2))
    # features shuffled across tokens carry no information about the masks: near chance
    perm = torch.randperm(masks.numel(), generator=torch.Generator().manual_seed(0))
    shuffled = feats.flatten(1, 3)[:, perm].reshape(feats.shape)
    chance = miou(torch.rand(masks[12:].shape, generator=torch.Generator().manual_seed(1)) < 0.5, masks[12:])
    shuffled_scores = linear_probe_segmentation(shuffled, masks, n_train=12)
    assert (shuffled_scores < 0.55).all() and (shuffled_scores - chance).abs().max() < 0.15
    label_control = linear_probe_segmentation(feats, masks, n_train=12, shuffle_labels=True)
    assert (label_control < 0.6).all()
    assert linear_probe_segmentation(feats[:1], masks, n_train=12, eval_masks=upsample_mask(masks, (12, 12)))[0] == 1.0
    with pytest.raises(ValueError, match="n_train"):
        linear_probe_segmentation(feats, masks, n_train=24)
    with pytest.raises((ValueError, TypeError)):  # jaxtyping checks the grid under pytest, ValueError otherwise
        linear_probe_segmentation(feats, masks[:, :4, :4], n_train=4)
    with pytest.raises((ValueError, TypeError)):
        linear_probe_segmentation(feats[0], masks, n_train=4)


def test_fit_logistic_multiclass_and_kmeans():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    y = torch.randint(0, 3, (90,), generator=g)
    x = centres[y] + 0.3 * torch.randn(90, 3, generator=g)
    assert (fit_logistic(x, y).predict(x) == y).all()
    labels, cents = kmeans(x, 3, seed=0)
    assert cents.shape == (3, 3)
    # clusters equal the classes up to renaming
    assert all(len(labels[y == c].unique()) == 1 for c in range(3)) and len(labels.unique()) == 3
    with pytest.raises(ValueError, match="k must"):
        kmeans(x, 0)


def test_query_segmentation_perfect_and_wrong_query():
    masks = blob_masks(6, seed=2)
    feats = perfect_features(masks)
    query = torch.zeros(2, 1, 8)
    query[..., 0] = 1.0
    assert torch.allclose(query_segmentation(feats, query, masks), torch.ones(2))
    assert torch.allclose(query_segmentation(feats, -query, masks), torch.zeros(2))  # the opposite query finds background
    per_image = query.expand(2, 6, 8)
    assert torch.allclose(query_segmentation(feats, per_image, masks, metric="dot"), torch.ones(2))
    with pytest.raises(ValueError, match="query_index"):
        query_segmentation(feats, torch.ones(2, 3, 8), masks)


def test_pck_identical_images_and_shifted_object():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 4, 6, 6, 16, generator=g)
    src = torch.tensor([[[0, 0], [2, 3], [5, 5]]]).expand(4, 3, 2)
    assert torch.allclose(correspondence_pck(feats, feats, src, src), torch.ones(2))
    # target = source moved two cells right: keypoints follow the move
    moved = torch.randn_like(feats)
    moved[:, :, :, 2:] = feats[:, :, :, :4]
    a = torch.zeros(4, 6, 6, dtype=torch.bool)
    a[:, 1:3, 0:2] = True
    b = torch.roll(a, 2, dims=2)
    sp, tp, valid = keypoints_from_masks(a, b)
    assert sp.shape == (4, 4, 2) and valid.all() and torch.equal(tp - sp, torch.tensor([0, 2]).expand(4, 4, 2))
    assert torch.allclose(correspondence_pck(feats, moved, sp, tp, valid=valid, threshold=0.0), torch.ones(2))
    noise = torch.randn(2, 4, 6, 6, 16, generator=g)
    assert correspondence_pck(feats, noise, sp, tp, threshold=0.0).max() < 0.5
    assert pck(torch.tensor([[[0, 0]]]), torch.tensor([[[1, 1]]]), threshold=1.5) == 1.0
    with pytest.raises(ValueError, match="moved"):
        keypoints_from_masks(a, torch.ones_like(a))


def test_cosegmentation_perfect_and_random():
    masks = blob_masks(8, seed=4)
    feats = perfect_features(masks)
    assert torch.allclose(cosegmentation(feats, masks, seed=0), torch.ones(2))
    random = torch.randn(1, 8, 6, 6, 8, generator=torch.Generator().manual_seed(0))
    assert cosegmentation(random, masks)[0] < 0.6


def test_label_propagation_identical_frames_exact():
    masks = blob_masks(5, seed=5)
    feats = torch.randn(3, 5, 6, 6, 12, generator=torch.Generator().manual_seed(1))
    assert torch.equal(label_propagation(feats, feats, masks, masks), torch.ones(3))
    assert label_propagation(feats, feats, masks, upsample_mask(masks, (30, 30)))[0] == 1.0
    # a frame moved one cell down, content and mask together
    moved, moved_masks = torch.roll(feats, 1, dims=2), torch.roll(masks, 1, dims=1)
    assert torch.equal(label_propagation(feats, moved, masks, moved_masks), torch.ones(3))
    other = torch.randn_like(feats)
    assert label_propagation(feats, other, masks, masks, k=3).max() < 0.8
