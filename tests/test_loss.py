"""Losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from anomalib_mvfa import DetectionLoss, MvfaLoss, TrainingOutputs
from anomalib_mvfa.loss import dice_loss, focal_loss

SMOOTH = 1e-5


def test_focal_loss_by_hand() -> None:
    # two pixels: p(abnormal) = 0.8 with target abnormal, p(abnormal) = 0.3 with target normal
    probabilities = torch.tensor([[[[0.2, 0.3]], [[0.8, 0.7]]]])  # 1 x 2 x 1 x 2
    target = torch.tensor([[[1, 0]]])
    p1 = 0.8 * (1 - SMOOTH) + 0.2 * SMOOTH + SMOOTH
    p2 = 0.3 * (1 - SMOOTH) + 0.7 * SMOOTH + SMOOTH
    expected = (-((1 - p1) ** 2) * math.log(p1) - (1 - p2) ** 2 * math.log(p2)) / 2
    assert focal_loss(probabilities, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_loss_by_hand() -> None:
    probabilities = torch.tensor([[[0.9, 0.1], [0.5, 0.0]], [[0.2, 0.2], [0.2, 0.2]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    first = (2 * (0.9 + 0.5) + 1) / (1.5 + 2 + 1)
    second = (0 + 1) / (0.8 + 0 + 1)
    assert dice_loss(probabilities, target).item() == pytest.approx(1 - (first + second) / 2, rel=1e-6)


def test_detection_loss_forms_by_hand() -> None:
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]]])  # 2 images x 2 tokens
    labels = torch.tensor([0, 1])
    p_abnormal = [
        (math.exp(1) / (1 + math.exp(1)) + 1 / (1 + math.exp(2))) / 2,
        (math.exp(3) / (1 + math.exp(3)) + 0.5) / 2,
    ]
    outputs = TrainingOutputs([torch.zeros(2, 2, 1, 1)], [logits])

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    authors = -(math.log(1 - sigmoid(p_abnormal[0])) + math.log(sigmoid(p_abnormal[1]))) / 2
    corrected = -(math.log(1 - p_abnormal[0]) + math.log(p_abnormal[1])) / 2
    _, det_authors = MvfaLoss()(outputs, labels)
    _, det_bce = MvfaLoss(detection_loss=DetectionLoss.BCE)(outputs, labels)
    assert det_authors.item() == pytest.approx(authors, rel=1e-6)
    assert det_bce.item() == pytest.approx(corrected, rel=1e-6)


def test_segmentation_loss_sums_layers_and_binarises_masks() -> None:
    torch.manual_seed(0)
    logits = [torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)]
    soft_masks = torch.rand(2, 4, 4)
    binary = (soft_masks > 0.5).float()
    expected = sum(
        focal_loss(torch.softmax(layer, 1), binary) + dice_loss(torch.softmax(layer, 1)[:, 1], binary)
        for layer in logits
    )
    segmentation, _ = MvfaLoss()(TrainingOutputs(logits, [torch.zeros(2, 16, 2)] * 2), torch.zeros(2), soft_masks)
    assert segmentation.item() == pytest.approx(expected.item(), rel=1e-6)
    no_masks, _ = MvfaLoss()(TrainingOutputs(logits, [torch.zeros(2, 16, 2)] * 2), torch.zeros(2))
    assert no_masks is None
