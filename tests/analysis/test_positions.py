import torch

from vlm_lens.analysis import (
    background_positions,
    dilate,
    high_norm_positions,
    object_positions,
    random_image_positions,
    vision_positions,
)


def test_dilate_grows_in_all_eight_directions():
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[2, 2] = True
    assert dilate(mask, 1).sum() == 9 and dilate(mask, 1)[1:4, 1:4].all()
    assert dilate(mask, 2).all()
    corner = torch.zeros(5, 5, dtype=torch.bool)
    corner[0, 0] = True
    assert dilate(corner, 1).sum() == 4  # clipped at the border
    assert torch.equal(dilate(mask, 0), mask)


def test_object_positions_with_buffer(one):
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 0] = True
    pos = object_positions(one.layout, 0, mask, buffer=1)
    grid = one.layout.grid(0)
    assert pos.tolist() == sorted([int(grid[0, 0]), int(grid[0, 1]), int(grid[1, 0]), int(grid[1, 1])])


def test_random_positions_are_seeded_distinct_and_avoid_exclusion(one):
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[:2] = True
    a = random_image_positions(one.layout, 0, 5, seed=1, exclude=exclude)
    b = random_image_positions(one.layout, 0, 5, seed=1, exclude=exclude)
    c = random_image_positions(one.layout, 0, 5, seed=2, exclude=exclude)
    assert torch.equal(a, b) and not torch.equal(a, c) and len(a.unique()) == 5
    assert not exclude[one.layout.positions_to_mask(0, a)].any()


def test_high_norm_positions_find_registers(one):
    acts = torch.randn(1, one.tokens.shape[1], 8) * 0.1
    target = one.layout.position(0, 2, 3)
    acts[0, target] *= 100
    assert high_norm_positions(one.layout, 0, acts).tolist() == [target]


def test_vision_positions_skip_cls():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True
    assert vision_positions(4, mask).tolist() == [1 + 4 + 2]


def test_background_positions_keep_a_margin_when_they_can(one):
    occupied = torch.zeros(4, 4, dtype=torch.bool)
    occupied[0, 0] = True
    pos = background_positions(one.layout, 0, 3, occupied, seed=0)
    mask = one.layout.positions_to_mask(0, pos)
    assert mask.sum() == 3 and not (mask & dilate(occupied, 1)).any()
    crowded = torch.ones(4, 4, dtype=torch.bool)
    crowded[3, 3] = False
    assert one.layout.positions_to_mask(0, background_positions(one.layout, 0, 1, crowded))[3, 3]
