"""Support-set selection from folders and synthetic abnormal images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_mvfa.support import SupportImages, draw_from_folder, synthesize_abnormal


def write_images(folder, count: int, size: int = 40, masks: tuple[int, ...] = ()) -> None:
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((size, size, 3), 20 * index, np.uint8)).save(folder / f"img{index}.PNG")
        if index in masks:
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 2] = 255  # top half abnormal
            Image.fromarray(mask).save(folder / "masks" / f"img{index}.png")


def test_folder_images_and_their_masks(tmp_path) -> None:
    write_images(tmp_path, 3, masks=(0, 2))
    support = draw_from_folder(tmp_path, k=3, seed=0, image_size=20, label=1)
    assert [name.rsplit("/", 1)[1] for name in support.sources] == ["img0.PNG", "img1.PNG", "img2.PNG"]
    assert support.images.shape == (3, 3, 20, 20)
    assert support.has_mask.tolist() == [True, False, True]
    expected = torch.zeros(20, 20)
    expected[:10] = 1
    assert torch.equal(support.masks[0], expected)
    assert torch.equal(support.masks[1], torch.zeros(20, 20))
    assert support.labels.tolist() == [1, 1, 1]


def test_folder_with_too_few_images_is_an_error(tmp_path) -> None:
    write_images(tmp_path, 2)
    with pytest.raises(ValueError, match=r"holds 2 image\(s\); k_shot=4 needs at least 4"):
        draw_from_folder(tmp_path, k=4, seed=0, image_size=20)
    with pytest.raises(ValueError, match="does not exist"):
        draw_from_folder(tmp_path / "missing", k=1, seed=0, image_size=20)


def test_synthetic_abnormal_images_are_seeded_and_leave_global_state_alone() -> None:
    normal = SupportImages(
        images=torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        masks=torch.zeros(3, 32, 32),
        labels=torch.zeros(3, dtype=torch.long),
        has_mask=torch.ones(3, dtype=torch.bool),
        sources=["a", "b", "c"],
    )
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = synthesize_abnormal(normal, seed=7)
    assert torch.equal(torch.rand(1), expected_next)  # global random stream untouched
    second = synthesize_abnormal(normal, seed=7)
    other = synthesize_abnormal(normal, seed=8)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.masks, second.masks)
    assert not torch.equal(first.masks, other.masks)
    assert first.masks.flatten(1).amax(dim=1).tolist() == [1.0, 1.0, 1.0]  # every image got a defect
    changed = (first.images != normal.images).any(dim=1).float()
    assert torch.equal(changed * first.masks, changed)  # pixels change only inside the masks
    assert first.sources == ["perlin(a)", "perlin(b)", "perlin(c)"]
