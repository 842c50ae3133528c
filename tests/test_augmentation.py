"""Support-set augmentation: 11 variants, masks follow the geometry."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_mvfa import augment_support_set


def test_eleven_variants_per_image_grouped_by_source() -> None:
    images = torch.rand(3, 3, 20, 20)
    support = augment_support_set(images, masks=torch.zeros(3, 20, 20))
    assert support.images.shape == (33, 3, 20, 20)
    assert support.masks.shape == (33, 20, 20)
    assert support.groups.tolist() == [i for i in range(3) for _ in range(11)]
    for i in range(3):
        assert torch.equal(support.images[11 * i], images[i])  # first variant: the image itself
        variants = support.images[11 * i : 11 * (i + 1)]
        assert len({tuple(v.flatten().tolist()) for v in variants}) == 11  # all distinct


def test_flips_and_translations_move_masks_exactly() -> None:
    masks = torch.zeros(1, 20, 20)
    masks[0, 4, 6] = 1  # one abnormal pixel at row 4, column 6
    support = augment_support_set(torch.rand(1, 3, 20, 20), masks)
    positions = [tuple(torch.nonzero(m).flatten().tolist()) for m in support.masks]
    assert positions[0] == (4, 6)
    assert positions[9] == (4, 13)  # horizontal flip: column 19 - 6
    assert positions[10] == (15, 6)  # vertical flip: row 19 - 4
    # translations by 0.1 of the half-size: 1 pixel at 20 x 20, in x and y
    assert sorted(positions[5:9]) == sorted([(5, 7), (3, 7), (5, 5), (3, 5)])


@pytest.mark.parametrize("variant", [1, 2, 3, 4])
def test_rotations_move_masks_with_the_image(variant) -> None:
    masks = torch.zeros(1, 41, 41)
    masks[0, 8:13, 26:31] = 1  # a square away from the centre
    images = masks[:, None].repeat(1, 3, 1, 1)  # the image shows the mask itself
    support = augment_support_set(images, masks)
    rotated_mask = support.masks[variant]
    rotated_image = support.images[variant, 0]
    # the mask's centroid rotates about the image centre by one of +-pi/8, +-pi/16
    rows, cols = torch.nonzero(rotated_mask, as_tuple=True)
    angle = math.atan2(-(rows.float().mean() - 20), cols.float().mean() - 20)
    start = math.atan2(-(10 - 20), 28 - 20)
    assert min(abs(angle - start - a) for a in (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)) < 0.03
    assert rotated_mask.unique().tolist() == [0.0, 1.0]  # still binary
    agreement = ((rotated_image > 0.5) == (rotated_mask > 0.5)).float().mean()
    assert agreement > 0.99


def test_mismatched_masks_are_rejected() -> None:
    with pytest.raises(ValueError, match="masks"):
        augment_support_set(torch.rand(2, 3, 20, 20), torch.zeros(2, 10, 10))
