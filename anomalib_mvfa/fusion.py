"""Fusion of MVFA's two branches, calibrated on normal support images.

The zero-shot branch (text prompts) and the few-shot branch (memory banks) give values on
different scales. Each is turned into a z-score with the mean and standard deviation it has on
the normal support images, and the two z-scores are averaged. The statistics live in the
``calibration`` buffer of :class:`~anomalib_mvfa.torch_model.MvfaModel` (checkpoint key
``model.calibration``): a ``4 x 2`` tensor whose rows are :data:`CALIBRATION_ROWS` and whose
columns are (mean, std); an empty tensor means "not calibrated", and the branches' raw values are
then averaged. No test image is ever used: the few-shot values of a support image are computed against the
other support images only (:func:`calibration_statistics`).

Example:
    >>> import torch
    >>> from anomalib_mvfa.fusion import BranchOutputs, fuse_branches
    >>> outputs = BranchOutputs(torch.rand(2, 8, 8), torch.rand(2), torch.rand(2, 8, 8), torch.rand(2))
    >>> score, anomaly_map = fuse_branches(outputs, calibration=torch.empty(0))
    >>> score.shape, anomaly_map.shape
    (torch.Size([2]), torch.Size([2, 8, 8]))
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .encoder import AdaptedTokens
from .errors import MvfaInputError

__all__ = [
    "CALIBRATION_ROWS",
    "UNCALIBRATED",
    "BranchOutputs",
    "calibration_groups",
    "calibration_statistics",
    "fuse_branches",
]

logger = logging.getLogger(__name__)

# Rows of the calibration buffer: (branch, level) pairs, each with (mean, std) of normal images.
CALIBRATION_ROWS = ("zero_shot_image", "zero_shot_pixel", "few_shot_image", "few_shot_pixel")
# The calibration that leaves every branch as it is (mean 0, std 1): fusion then averages the raw values.
UNCALIBRATED = torch.tensor([[0.0, 1.0]] * len(CALIBRATION_ROWS))

# (anomaly map ``B x H x W``, score ``B``) of one branch.
BranchResult = tuple[torch.Tensor, torch.Tensor]


@dataclass
class BranchOutputs:
    """Raw outputs of MVFA's two branches, summed over the feature layers.

    Attributes:
        zero_shot_map: ``B x H x W`` abnormal probability from the segmentation tokens.
        zero_shot_score: ``B`` mean abnormal probability of the detection tokens.
        few_shot_map: ``B x H x W`` nearest-neighbour cosine distance of the
            segmentation tokens, ``None`` without a memory bank.
        few_shot_score: ``B`` mean of the detection tokens' distance map, ``None``
            without a memory bank.
    """

    zero_shot_map: torch.Tensor
    zero_shot_score: torch.Tensor
    few_shot_map: torch.Tensor | None = None
    few_shot_score: torch.Tensor | None = None


def calibration_groups(groups: torch.Tensor | None, count: int) -> torch.Tensor | None:
    """The source-image ids of ``count`` normal images for calibration, or ``None`` if they are too few.

    ``groups`` defaults to one group per image; with a single group, each image is its own group
    (a warning says the few-shot statistics are then optimistic). Fewer than 2 images cannot be
    calibrated (a warning says so).

    Raises:
        MvfaInputError: If ``groups`` does not hold one id per image.

    Example:
        >>> calibration_groups(torch.tensor([0, 0, 1, 1]), count=4)
        tensor([0, 0, 1, 1])
        >>> calibration_groups(None, count=3)
        tensor([0, 1, 2])
    """
    if count < 2:
        logger.warning("Calibration needs at least 2 normal images; forward will fuse uncalibrated branches.")
        return None
    groups = torch.arange(count) if groups is None else torch.as_tensor(groups).cpu()
    if groups.shape != (count,):
        msg = f"groups must hold one id per normal image ({count}), got shape {tuple(groups.shape)}."
        raise MvfaInputError(msg)
    if groups.unique().numel() < 2:
        logger.warning("All normal images share one group: few-shot calibration treats each image as a group.")
        groups = torch.arange(count)
    return groups


def calibration_statistics(
    tokens: AdaptedTokens,
    groups: torch.Tensor,
    zero_shot: Callable[[AdaptedTokens], BranchResult],
    few_shot: Callable[[AdaptedTokens, AdaptedTokens], BranchResult],
) -> torch.Tensor:
    """The calibration buffer (``4 x 2``, see :data:`CALIBRATION_ROWS`) of normal images' adapted tokens.

    The few-shot values are computed leave-one-group-out: ``few_shot(held_out, others)`` scores the
    tokens of one group against memory banks of the other groups' tokens, because an image's own
    tokens are in the real memory bank.

    Args:
        tokens: Adapted tokens of the ``N`` normal images.
        groups: ``N`` source-image ids (see :func:`calibration_groups`).
        zero_shot: The zero-shot branch: tokens to (anomaly map, score).
        few_shot: The few-shot branch: (held-out tokens, other tokens) to (anomaly map, score).

    Example:
        >>> zero_shot, few_shot = model.zero_shot_branch, against_others  # doctest: +SKIP
        >>> calibration = calibration_statistics(tokens, groups, zero_shot, few_shot)  # doctest: +SKIP
        >>> calibration.shape  # doctest: +SKIP
        torch.Size([4, 2])
    """
    zero_shot_map, zero_shot_score = zero_shot(tokens)
    few_shot_map = torch.empty_like(zero_shot_map)
    few_shot_score = torch.empty_like(zero_shot_score)
    for group in groups.unique():
        inside = (groups == group).to(zero_shot_map.device)
        held_out, others = tokens.select(inside), tokens.select(~inside)
        few_shot_map[inside], few_shot_score[inside] = few_shot(held_out, others)
    values = (zero_shot_score, zero_shot_map, few_shot_score, few_shot_map)
    return torch.stack([torch.stack([value.mean(), value.std()]) for value in values]).float()


def fuse_branches(outputs: BranchOutputs, calibration: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fuse branch outputs into an image score (``B``) and an anomaly map (``B x H x W``).

    With few-shot outputs: the average of the two branches' z-scores with respect to
    ``calibration`` (of their raw values when it is empty, that is not calibrated). Without:
    the zero-shot branch alone.

    Example:
        >>> outputs = BranchOutputs(torch.ones(1, 2, 2), torch.ones(1), torch.ones(1, 2, 2), torch.ones(1))
        >>> fuse_branches(outputs, calibration=torch.empty(0))[0]
        tensor([1.])
    """
    if outputs.few_shot_map is None or outputs.few_shot_score is None:
        return outputs.zero_shot_score, outputs.zero_shot_map
    if calibration.numel() == 0:
        calibration = UNCALIBRATED.to(outputs.zero_shot_map.device)
    mean, std = calibration[:, 0], calibration[:, 1].clamp_min(torch.finfo(torch.float32).eps)
    branch_values = (outputs.zero_shot_score, outputs.zero_shot_map, outputs.few_shot_score, outputs.few_shot_map)
    zs_score, zs_map, fs_score, fs_map = ((v - m) / s for v, m, s in zip(branch_values, mean, std, strict=True))
    return 0.5 * (zs_score + fs_score), 0.5 * (zs_map + fs_map)
