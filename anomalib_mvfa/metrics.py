"""Metrics that say when they are undefined instead of printing a number.

AUROC compares normal with abnormal samples; with one class only (a test split of normal images,
or masks without an abnormal pixel) it is undefined. torchmetrics then returns 0.0, which reads
like the worst possible detector. :class:`DefinedAUROC` returns NaN and logs why, and
:func:`undefined_auroc_reason` gives the same reason to the package's tables.

Example:
    >>> import torch
    >>> undefined_auroc_reason(torch.tensor([0, 0, 0]), "image AUROC")
    'image AUROC is undefined: all 3 targets are normal (it needs normal and abnormal ones)'
"""

from __future__ import annotations

import logging

import torch
from anomalib.metrics import AUROC, Evaluator, F1Score
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

logger = logging.getLogger(__name__)


def exact_auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AUROC of scores of any range, ties counted as torchmetrics and scikit-learn count them.

    torchmetrics passes scores outside [0, 1] through a sigmoid, which in float32 rounds every score
    above about 17 to 1.0: distinct z-scores become ties and the AUROC changes. Dense ranks scaled
    to [0, 1] (float64) keep the order and the ties.

    Example:
        >>> exact_auroc(torch.tensor([20.0, 30.0, 40.0, 50.0]), torch.tensor([0, 1, 0, 1]))
        0.75
    """
    values, ranks = torch.unique(scores.detach().flatten(), sorted=True, return_inverse=True)
    scaled = ranks.double() / max(values.numel() - 1, 1)
    return binary_auroc(scaled, targets.detach().flatten().long(), validate_args=False).item()


def undefined_auroc_reason(targets: torch.Tensor, name: str) -> str | None:
    """Why AUROC over ``targets`` (0 normal, 1 abnormal) is undefined, or ``None`` when it is defined."""
    count = targets.numel()
    if count == 0:
        return f"{name} is undefined: there are no targets"
    positives = int((targets > 0).sum())
    if 0 < positives < count:
        return None
    kind = "abnormal" if positives else "normal"
    return f"{name} is undefined: all {count} targets are {kind} (it needs normal and abnormal ones)"


class DefinedAUROC(AUROC):
    """anomalib's AUROC, but NaN with a logged reason when the targets hold a single class.

    Example:
        >>> metric = DefinedAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.name = self.name.replace(type(self).__name__, "AUROC")  # results keep anomalib's names

    def compute(self) -> torch.Tensor | None:
        """AUROC, or NaN (and a warning naming the reason) when it is undefined."""
        if self._update_count == 0 and not self.strict:  # nothing to score (no masks): anomalib's None
            return None
        reason = undefined_auroc_reason(dim_zero_cat(self.target), self.name)
        if reason is not None:
            logger.warning("%s; reported as nan.", reason)
            return torch.tensor(float("nan"))
        return super().compute()


def mvfa_evaluator() -> Evaluator:
    """Anomalib's default test metrics (image and pixel AUROC and F1) with :class:`DefinedAUROC`."""
    return Evaluator(
        test_metrics=[
            DefinedAUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
            DefinedAUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            F1Score(fields=["pred_mask", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )
