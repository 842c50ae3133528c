"""Losses of MVFA.

Segmentation: focal loss (gamma 2) on the two-class softmax of the upsampled text
logits plus a binary Dice loss on the abnormal channel. Detection: binary
cross-entropy between the image label and the mean abnormal probability of the
detection tokens. Each loss is summed over the feature layers.

Images whose mask is unknown are left out of the segmentation loss by a per-sample
weight of zero, not by selecting samples: nothing in the loss reads a value back from
the device, so a GPU never waits in the training step.

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
from typing import Literal

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
    reduction: Literal["mean", "none"] = "mean",
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
        reduction: ``"mean"`` over all pixels, or ``"none"``: the mean of each image (``B``).

    Example:
        >>> probabilities = torch.tensor([0.9, 0.1]).reshape(1, 2, 1, 1)
        >>> round(focal_loss(probabilities, torch.zeros(1, 1, 1)).item(), 5)
        0.00105
    """
    target = target.reshape(probabilities.shape[0], *probabilities.shape[2:]).long()
    classes = torch.arange(probabilities.shape[1], device=target.device).view(1, -1, *[1] * (target.dim() - 1))
    one_hot = (target.unsqueeze(1) == classes).to(probabilities.dtype)  # F.one_hot reads the maximum back
    one_hot = one_hot.clamp(smooth / (probabilities.shape[1] - 1), 1.0 - smooth)
    p_true = (one_hot * probabilities).sum(dim=1) + smooth
    loss = -((1.0 - p_true) ** gamma) * p_true.log()
    return loss.mean() if reduction == "mean" else loss.flatten(1).mean(dim=1)


def dice_loss(
    probabilities: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1.0,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Binary Dice loss ``1 - mean_b (2 |P T| + s) / (|P| + |T| + s)``.

    Args:
        probabilities: ``B x H x W`` probabilities of the positive class.
        target: ``B x H x W`` binary targets.
        smooth: Added to numerator and denominator.
        reduction: ``"mean"`` over images, or ``"none"``: the loss of each image (``B``).

    Example:
        >>> round(dice_loss(torch.ones(1, 2, 2), torch.ones(1, 2, 2)).item(), 5)
        0.0
    """
    predicted = probabilities.flatten(1)
    target = target.reshape(predicted.shape).to(predicted.dtype)
    dice = (2 * (predicted * target).sum(dim=1) + smooth) / (predicted.sum(dim=1) + target.sum(dim=1) + smooth)
    return 1.0 - dice.mean() if reduction == "mean" else 1.0 - dice


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor | None = None) -> torch.Tensor:
    """``sum(w * v) / total``, ``total`` being ``sum(w)`` by default; 0 when it is 0 (no host synchronisation).

    Example:
        >>> weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.0])).item()
        1.0
    """
    weights = weights.to(values.dtype)
    total = weights.sum() if total is None else total.to(values.dtype)
    return (values * weights).sum() / total.clamp_min(torch.finfo(values.dtype).tiny)


def distributed_total(local: torch.Tensor) -> torch.Tensor:
    """The denominator that makes DDP's averaged gradients those of one batch of every process's samples.

    DDP averages gradients over the N processes; with each process dividing its sum by the mean over
    processes of the local totals (``sum(all totals) / N``), the average is the gradient of
    ``sum(all values) / sum(all totals)``, as one process loading the N batches would compute it. One
    ``all_reduce`` of a scalar: no host synchronisation. Outside distributed training, ``local``.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    processes = torch.distributed.get_world_size()
    if processes == 1:
        return local
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    return total / processes


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
        # set by the Lightning module while it trains under DDP (see distributed_total)
        self.distributed = False
        self.last_weight_total: torch.Tensor | None = None

    def _total(self, local: torch.Tensor) -> torch.Tensor:
        return distributed_total(local) if self.distributed else local

    def segmentation(
        self, logits: list[torch.Tensor], masks: torch.Tensor, weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Focal + Dice loss of the upsampled segmentation logits against ``masks``.

        ``weights`` (``B``, default all 1) weigh each image's loss; the result is their weighted mean.
        """
        target = (masks.reshape(masks.shape[0], *logits[0].shape[2:]) > self.mask_threshold).float()
        weights = target.new_ones(target.shape[0]) if weights is None else weights.reshape(-1)
        weight_total = self._total(weights.to(target.dtype).sum())
        self.last_weight_total = weight_total.detach()  # the weight of this batch's loss in an epoch mean
        total = logits[0].new_zeros(())
        for layer_logits in logits:
            probabilities = torch.softmax(layer_logits, dim=1)
            focal = focal_loss(probabilities, target, reduction="none")
            dice = dice_loss(probabilities[:, 1], target, reduction="none")
            total = total + weighted_mean(focal, weights, weight_total) + weighted_mean(dice, weights, weight_total)
        return total

    def detection(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Detection loss between image ``labels`` and the mean abnormal probability of the tokens."""
        labels = labels.reshape(-1).to(logits[0].dtype)
        count = self._total(labels.new_full((), float(labels.numel())))  # a fill on the device, no copy
        total = logits[0].new_zeros(())
        for layer_logits in logits:
            probability = torch.softmax(layer_logits, dim=-1)[..., 1].mean(dim=-1)
            if self.detection_loss is DetectionLoss.AUTHORS:
                summed = F.binary_cross_entropy_with_logits(probability, labels, reduction="sum")
            else:
                summed = F.binary_cross_entropy(probability, labels, reduction="sum")
            total = total + summed / count
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
            has_mask: Optional ``B`` booleans: only these samples enter the segmentation loss
                (as weights; a batch without any gives a segmentation loss of 0).

        Returns:
            The segmentation loss (``None`` when ``masks`` is ``None``) and the detection loss.
        """
        segmentation = None
        if masks is not None:
            segmentation = self.segmentation(outputs.segmentation_logits, masks, has_mask)
        return segmentation, self.detection(outputs.detection_logits, labels)
