"""Losses of MVFA.

Segmentation: focal loss (gamma 2) on the two-class softmax of the upsampled text
logits plus a binary Dice loss on the abnormal channel. Detection: binary
cross-entropy between the image label and the mean abnormal probability of the
detection tokens. Each loss is summed over the feature layers.

The authors apply ``BCEWithLogitsLoss`` to that probability, i.e. they pass it
through a second sigmoid. :attr:`DetectionLoss.AUTHORS` reproduces this (the
default, so that published numbers can be reproduced); :attr:`DetectionLoss.BCE`
is the corrected binary cross-entropy on the probability itself.

Example:
    >>> from anomalib_mvfa.loss import MvfaLoss
    >>> criterion = MvfaLoss()
    >>> outputs = model.train()(images)  # doctest: +SKIP
    >>> segmentation_loss, detection_loss = criterion(outputs, labels, masks)  # doctest: +SKIP
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .torch_model import TrainingOutputs


class DetectionLoss(str, Enum):
    """Form of the detection loss.

    ``AUTHORS``: ``BCEWithLogitsLoss`` applied to the mean abnormal probability, as in
    the authors' code. ``BCE``: binary cross-entropy on that probability (corrected).
    """

    AUTHORS = "authors"
    BCE = "bce"


def focal_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Focal loss on class probabilities.

    ``mean(-(1 - p_t)^gamma * log(p_t))`` where ``p_t`` is the probability given to the
    true class. As in MVFA, the one-hot target is clipped to ``[smooth, 1 - smooth]``
    and ``smooth`` is added to ``p_t`` before the logarithm.

    Args:
        probabilities: ``B x K x H x W`` class probabilities (softmax output).
        target: ``B x H x W`` (or ``B x 1 x H x W``) class indices.
        gamma: Focusing parameter.
        smooth: Label smoothing and log offset.

    Example:
        >>> probabilities = torch.tensor([0.9, 0.1]).reshape(1, 2, 1, 1)
        >>> round(focal_loss(probabilities, torch.zeros(1, 1, 1)).item(), 5)
        0.00105
    """
    target = target.reshape(probabilities.shape[0], *probabilities.shape[2:]).long()
    one_hot = F.one_hot(target, probabilities.shape[1]).movedim(-1, 1).to(probabilities.dtype)
    one_hot = one_hot.clamp(smooth / (probabilities.shape[1] - 1), 1.0 - smooth)
    p_true = (one_hot * probabilities).sum(dim=1) + smooth
    return (-((1.0 - p_true) ** gamma) * p_true.log()).mean()


def dice_loss(probabilities: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary Dice loss ``1 - mean_b (2 |P T| + s) / (|P| + |T| + s)``.

    Args:
        probabilities: ``B x H x W`` probabilities of the positive class.
        target: ``B x H x W`` binary targets.
        smooth: Added to numerator and denominator.

    Example:
        >>> round(dice_loss(torch.ones(1, 2, 2), torch.ones(1, 2, 2)).item(), 5)
        0.0
    """
    predicted = probabilities.flatten(1)
    target = target.reshape(predicted.shape).to(predicted.dtype)
    dice = (2 * (predicted * target).sum(dim=1) + smooth) / (predicted.sum(dim=1) + target.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


class MvfaLoss(nn.Module):
    """Segmentation and detection losses of MVFA, summed over feature layers.

    Args:
        detection_loss: Form of the detection loss, see :class:`DetectionLoss`.
        mask_threshold: Mask values above it count as abnormal.

    Example:
        >>> criterion = MvfaLoss(detection_loss="bce")
        >>> logits = [torch.zeros(2, 2, 8, 8)]
        >>> outputs = TrainingOutputs(logits, [torch.zeros(2, 4, 2)])
        >>> seg, det = criterion(outputs, torch.tensor([0, 1]), torch.zeros(2, 8, 8))
        >>> round(det.item(), 4)
        0.6931
    """

    def __init__(
        self,
        detection_loss: DetectionLoss | str = DetectionLoss.AUTHORS,
        mask_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.detection_loss = DetectionLoss(detection_loss)
        self.mask_threshold = mask_threshold

    def segmentation(self, logits: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Focal + Dice loss of the upsampled segmentation logits against ``masks``."""
        target = (masks.reshape(masks.shape[0], *logits[0].shape[2:]) > self.mask_threshold).float()
        total = logits[0].new_zeros(())
        for layer_logits in logits:
            probabilities = torch.softmax(layer_logits, dim=1)
            total = total + focal_loss(probabilities, target) + dice_loss(probabilities[:, 1], target)
        return total

    def detection(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Detection loss between image ``labels`` and the mean abnormal probability of the tokens."""
        labels = labels.reshape(-1).to(logits[0].dtype)
        total = logits[0].new_zeros(())
        for layer_logits in logits:
            probability = torch.softmax(layer_logits, dim=-1)[..., 1].mean(dim=-1)
            if self.detection_loss is DetectionLoss.AUTHORS:
                total = total + F.binary_cross_entropy_with_logits(probability, labels)
            else:
                total = total + F.binary_cross_entropy(probability, labels)
        return total

    def forward(
        self,
        outputs: TrainingOutputs,
        labels: torch.Tensor,
        masks: torch.Tensor | None = None,
        has_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Return ``(segmentation_loss, detection_loss)``.

        Args:
            outputs: The model's training outputs.
            labels: ``B`` image labels (1: abnormal).
            masks: ``B x H x W`` masks, or ``None`` when no sample has one.
            has_mask: Optional ``B`` booleans: only these samples enter the segmentation loss.

        Returns:
            The segmentation loss (``None`` when no sample has a mask) and the detection loss.
        """
        segmentation = None
        logits = outputs.segmentation_logits
        if masks is not None and has_mask is not None:
            has_mask = has_mask.reshape(-1).bool()
            logits, masks = [layer[has_mask] for layer in logits], masks[has_mask]
        if masks is not None and masks.shape[0] > 0:
            segmentation = self.segmentation(logits, masks)
        return segmentation, self.detection(outputs.detection_logits, labels)
