"""Support-set augmentation of MVFA.

Each support image becomes 11: itself, rotations by -pi/8, -pi/16, pi/16 and pi/8,
translations by (+-0.1, +-0.1) of the half-size, a horizontal and a vertical flip.
Empty borders are filled by reflection. Masks undergo the same geometry (nearest
neighbour sampling, so they stay binary).

Example:
    >>> import torch
    >>> from anomalib_mvfa import augment_support_set
    >>> support = augment_support_set(torch.rand(4, 3, 64, 64), masks=torch.zeros(4, 64, 64))
    >>> support.images.shape, support.masks.shape, support.groups[:12].tolist()
    (torch.Size([44, 3, 64, 64]), torch.Size([44, 64, 64]), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from kornia.geometry.transform import hflip, rotate, translate, vflip

from ..errors import MvfaInputError

ROTATION_ANGLES = (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)
TRANSLATIONS = ((0.1, 0.1), (0.1, -0.1), (-0.1, 0.1), (-0.1, -0.1))
VARIANTS_PER_IMAGE = 1 + len(ROTATION_ANGLES) + len(TRANSLATIONS) + 2


@dataclass
class SupportSet:
    """Augmented support images.

    Attributes:
        images: ``(11 N) x C x H x W``, the variants of image ``i`` at rows ``11 i`` to ``11 i + 10``.
        masks: ``(11 N) x H x W`` moved with the images, or ``None``.
        groups: ``11 N`` index of the source image of each row.
    """

    images: torch.Tensor
    masks: torch.Tensor | None
    groups: torch.Tensor


def _geometries(height: int, width: int) -> list[Callable[[torch.Tensor, str], torch.Tensor]]:
    """The 11 geometric transforms, each taking a ``B x C x H x W`` tensor and an interpolation mode."""

    def identity(tensor: torch.Tensor, _mode: str) -> torch.Tensor:
        return tensor

    def rotation(angle: float) -> Callable[[torch.Tensor, str], torch.Tensor]:
        def apply(tensor: torch.Tensor, mode: str) -> torch.Tensor:
            degrees = torch.full((tensor.shape[0],), math.degrees(angle), dtype=tensor.dtype, device=tensor.device)
            return rotate(tensor, degrees, mode=mode, padding_mode="reflection")

        return apply

    def translation(shift_x: float, shift_y: float) -> Callable[[torch.Tensor, str], torch.Tensor]:
        def apply(tensor: torch.Tensor, mode: str) -> torch.Tensor:
            pixels = torch.tensor([[shift_x * width / 2, shift_y * height / 2]], dtype=tensor.dtype)
            pixels = pixels.to(tensor.device).expand(tensor.shape[0], 2)
            return translate(tensor, pixels, mode=mode, padding_mode="reflection")

        return apply

    return [
        identity,
        *(rotation(angle) for angle in ROTATION_ANGLES),
        *(translation(shift_x, shift_y) for shift_x, shift_y in TRANSLATIONS),
        lambda tensor, _mode: hflip(tensor),
        lambda tensor, _mode: vflip(tensor),
    ]


def augment_support_set(images: torch.Tensor, masks: torch.Tensor | None = None) -> SupportSet:
    """Augment support images (and their masks) into MVFA's 11 variants each.

    Args:
        images: ``N x C x H x W`` images.
        masks: Optional ``N x H x W`` or ``N x 1 x H x W`` masks.

    Returns:
        A :class:`SupportSet` with the variants of each image next to each other.

    Raises:
        ValueError: If the shapes do not fit.
    """
    if images.ndim != 4:
        msg = f"images must be N x C x H x W, got shape {tuple(images.shape)}."
        raise MvfaInputError(msg)
    count, _, height, width = images.shape
    mask_batch = None
    if masks is not None:
        mask_batch = masks.reshape(count, 1, height, width) if masks.numel() == count * height * width else None
        if mask_batch is None:
            msg = f"masks must be N x H x W matching images {tuple(images.shape)}, got shape {tuple(masks.shape)}."
            raise MvfaInputError(msg)
        mask_batch = mask_batch.to(images.dtype)

    image_variants, mask_variants = [], []
    for geometry in _geometries(height, width):
        image_variants.append(geometry(images, "bilinear"))
        if mask_batch is not None:
            mask_variants.append(geometry(mask_batch, "nearest"))

    def interleave(variants: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(variants, dim=1).flatten(0, 1)

    return SupportSet(
        images=interleave(image_variants),
        masks=None if mask_batch is None else interleave(mask_variants)[:, 0].to(masks.dtype),
        groups=torch.arange(count).repeat_interleave(VARIANTS_PER_IMAGE),
    )
