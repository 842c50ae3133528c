"""Study-level results: one score, label and decision per volume (a NIfTI file, a DICOM series).

Radiologists read studies, not slices. Every sample of the package's datasets carries its
``study`` (the volume it is a slice of, :mod:`~anomalib_mvfa.data.series`); here the slice scores of
each study become one study score:

- ``max`` (default): the highest slice score (one abnormal slice makes an abnormal study);
- ``top_k_mean``: the mean of the ``k`` highest slice scores (less sensitive to one noisy slice);
- ``mean``: the mean of all slice scores.

A study is abnormal when any of its slices is (a label or a mask voxel). Its decision compares its
score with a study threshold fitted on the *validation* split's studies (:func:`fit_study_threshold`,
the F1-optimal threshold, as anomalib fits image thresholds), never on the test labels.

Example:
    >>> results = study_results(["a", "a", "b"], [0.1, 0.9, 0.3], labels=[0, 1, 0])
    >>> [(result.study, result.score, result.label, result.top_slice) for result in results]
    [('a', 0.9, 1, 1), ('b', 0.3, 0, 2)]
    >>> study_auroc(results)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .errors import MvfaInputError
from .metrics import exact_auroc, undefined_auroc_reason

__all__ = [
    "STUDY_SCORES",
    "StudyResult",
    "aggregate_scores",
    "fit_study_threshold",
    "has_volumes",
    "study_auroc",
    "study_results",
]

STUDY_SCORES = ("max", "top_k_mean", "mean")


def check_study_score(method: str, k: int) -> None:
    """Refuse an unknown aggregation or a ``k`` below 1, naming them.

    Raises:
        MvfaInputError: Naming the setting and the choices.
    """
    if method not in STUDY_SCORES:
        msg = f"study_score must be one of {STUDY_SCORES}, got {method!r}."
        raise MvfaInputError(msg)
    if k < 1:
        msg = f"k (the slices top_k_mean averages) must be 1 or more, got {k}."
        raise MvfaInputError(msg)


def aggregate_scores(scores: Sequence[float], method: str = "max", k: int = 3) -> float:
    """One study score of its slice scores (module docstring); ``top_k_mean`` of fewer slices averages them all.

    Example:
        >>> aggregate_scores([0.2, 0.8, 0.5, 0.1], "top_k_mean", k=2)
        0.65
    """
    check_study_score(method, k)
    values = sorted((float(score) for score in scores), reverse=True)
    if not values:
        msg = "A study needs at least one slice score."
        raise MvfaInputError(msg)
    if method == "max":
        return values[0]
    chosen = values[:k] if method == "top_k_mean" else values
    return sum(chosen) / len(chosen)


@dataclass(frozen=True)
class StudyResult:
    """One study: its slices, score, label (``None`` when unlabelled), decision and highest-scoring slice.

    ``top_slice`` is the position (in the given order) of the slice with the highest score, and
    ``top_name`` its sample name where names were given.
    """

    study: str
    slices: int
    score: float
    label: int | None
    top_slice: int
    top_name: str = ""
    decision: int | None = None

    def row(self) -> dict[str, object]:
        """The result as a table row."""
        return asdict(self)


def study_results(
    studies: Sequence[str],
    scores: Sequence[float] | torch.Tensor,
    labels: Sequence[int] | torch.Tensor | None = None,
    names: Sequence[str] | None = None,
    method: str = "max",
    k: int = 3,
    threshold: float | None = None,
) -> list[StudyResult]:
    """The results of every study, in the order studies first appear.

    Args:
        studies: The study of each slice.
        scores: The score of each slice.
        labels: The label of each slice (0 normal, 1 abnormal); a study is abnormal when any slice is.
        names: The sample name of each slice (for ``top_name``).
        method: ``"max"``, ``"top_k_mean"`` or ``"mean"``.
        k: Slices ``top_k_mean`` averages.
        threshold: Study threshold: ``decision`` is 1 where the study score is above it.
    """
    check_study_score(method, k)
    scores = [float(score) for score in scores]
    labels = None if labels is None else [int(label) for label in labels]
    if len(scores) != len(studies) or (labels is not None and len(labels) != len(studies)):
        counts = f"{len(studies)} studies, {len(scores)} scores and {len(labels or studies)} labels"
        msg = f"{counts}: one of each per slice."
        raise MvfaInputError(msg)
    members: dict[str, list[int]] = {}
    for index, study in enumerate(studies):
        members.setdefault(str(study), []).append(index)
    results = []
    for study, indices in members.items():
        score = aggregate_scores([scores[index] for index in indices], method, k)
        top = max(indices, key=lambda index: scores[index])
        results.append(
            StudyResult(
                study=study,
                slices=len(indices),
                score=score,
                label=None if labels is None else max(labels[index] for index in indices),
                top_slice=top,
                top_name="" if names is None else str(names[top]),
                decision=None if threshold is None else int(score > threshold),
            )
        )
    return results


def has_volumes(studies: Sequence[str]) -> bool:
    """Whether some study holds several slices (otherwise study results repeat the image results).

    Example:
        >>> has_volumes(["a.png", "b.png"]), has_volumes(["series1", "series1"])
        (False, True)
    """
    return len(set(studies)) < len(studies)


def study_auroc(results: Sequence[StudyResult]) -> float | None:
    """AUROC (0 to 1) of the study scores against the study labels; ``None`` without both classes."""
    reason = study_auroc_reason(results)
    if reason is not None:
        return None
    scores = torch.tensor([result.score for result in results], dtype=torch.float64)
    return exact_auroc(scores, torch.tensor([int(result.label or 0) for result in results]))


def study_auroc_reason(results: Sequence[StudyResult]) -> str | None:
    """Why the study AUROC is undefined (unlabelled studies, one class only), or ``None``."""
    if any(result.label is None for result in results):
        return "study AUROC is undefined: some studies have no label"
    return undefined_auroc_reason(torch.tensor([int(result.label) for result in results]), "study AUROC")


def fit_study_threshold(results: Sequence[StudyResult]) -> float | None:
    """The F1-optimal threshold of labelled study scores (a study is abnormal above it); ``None`` without studies.

    With abnormal studies only or normal studies only, F1 cannot separate them: the threshold is
    then the highest normal score (or just below the lowest abnormal one), so that no normal
    study of the fit is called abnormal.

    Example:
        >>> results = study_results(["a", "b", "c"], [0.2, 0.5, 0.9], labels=[0, 0, 1])
        >>> fit_study_threshold(results)
        0.5
    """
    labelled = [(result.score, int(result.label)) for result in results if result.label is not None]
    if not labelled:
        return None
    normal = [score for score, label in labelled if label == 0]
    abnormal = [score for score, label in labelled if label == 1]
    if not normal or not abnormal:
        return max(normal) if normal else min(abnormal) - 1e-6
    best, best_f1 = max(normal), -1.0
    scores = sorted({score for score, _ in labelled})
    for candidate in [*scores, scores[0] - 1e-6]:  # the last: every study abnormal
        true = sum(score > candidate for score in abnormal)
        false = sum(score > candidate for score in normal)
        precision = true / (true + false) if true + false else 0.0
        recall = true / len(abnormal)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 > best_f1:
            best, best_f1 = candidate, f1
    return best
