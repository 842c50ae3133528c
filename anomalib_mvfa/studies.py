"""Study-level results: one score, label and decision per volume (a NIfTI file, a DICOM series).

Radiologists read studies, not slices. Every sample of the package's datasets carries its
``study`` (the volume it is a slice of, :mod:`~anomalib_mvfa.data.series`); here the slice scores of
each study become one study score:

- ``max`` (default): the highest slice score (one abnormal slice makes an abnormal study);
- ``top_k_mean``: the mean of the ``k`` highest slice scores (less sensitive to one noisy slice);
- ``mean``: the mean of all slice scores.

A study is abnormal when any of its slices is (a label or a mask voxel), unless its label is given:
:func:`read_study_labels` reads a CSV file of study labels (a radiologist's reading of each volume,
say), which then replace the labels of the slices (``study_results(..., study_labels=...)``). Its decision compares its
score with a study threshold fitted on the *validation* split's studies (:func:`fit_study_threshold`,
the F1-optimal threshold, as anomalib fits image thresholds), never on the test labels.

Example:
    >>> results = study_results(["a", "a", "b"], [0.1, 0.9, 0.3], labels=[0, 1, 0])
    >>> [(result.study, result.score, result.label, result.top_slice) for result in results]
    [('a', 0.9, 1, 1), ('b', 0.3, 0, 2)]
    >>> study_auroc(results)
    1.0
    >>> [result.label for result in study_results(["a", "a", "b"], [0.1, 0.9, 0.3], study_labels={"a": 0, "b": 1})]
    [0, 1]
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath

import torch

from .errors import MvfaInputError
from .metrics import exact_auroc, undefined_auroc_reason

__all__ = [
    "STUDY_SCORES",
    "StudyLabels",
    "StudyResult",
    "aggregate_scores",
    "fit_study_threshold",
    "has_volumes",
    "labels_of_studies",
    "read_study_labels",
    "study_auroc",
    "study_results",
]

STUDY_SCORES = ("max", "top_k_mean", "mean")
# the values of a study labels file's label column (case-insensitive) and the labels they stand for
LABEL_VALUES = {"0": 0, "1": 1, "normal": 0, "abnormal": 1}
# a NIfTI study (its file's path) is also found by its file name (anomalib_mvfa.data.nifti.NIFTI_SUFFIXES)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


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
    study_labels: Mapping[str, int] | None = None,
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
        study_labels: The label of each study (:func:`read_study_labels`), instead of its slices' labels;
            every study must have one (:func:`labels_of_studies`).

    Raises:
        MvfaInputError: If the counts differ, or ``study_labels`` lacks a study.
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
    given = None if study_labels is None else labels_of_studies(members, study_labels)
    results = []
    for study, indices in members.items():
        score = aggregate_scores([scores[index] for index in indices], method, k)
        top = max(indices, key=lambda index: scores[index])
        results.append(
            StudyResult(
                study=study,
                slices=len(indices),
                score=score,
                label=_study_label(study, indices, labels, given),
                top_slice=top,
                top_name="" if names is None else str(names[top]),
                decision=None if threshold is None else int(score > threshold),
            )
        )
    return results


def _study_label(study: str, indices: list[int], labels: list[int] | None, given: dict[str, int] | None) -> int | None:
    """The given label of ``study``, else the highest label of its slices, else ``None``."""
    if given is not None:
        return given[study]
    return None if labels is None else max(labels[index] for index in indices)


class StudyLabels(dict[str, int]):
    """``{study: label}`` as a study labels file gives them (:func:`read_study_labels`), and that file.

    Example:
        >>> StudyLabels({"1.2.3": 1}, source="labels.csv").source
        'labels.csv'
    """

    def __init__(self, labels: Mapping[str, int], source: str = "the study labels") -> None:
        super().__init__(labels)
        self.source = source


def read_study_labels(path: str | Path) -> StudyLabels:
    r"""The study labels of a CSV file: a header row with the columns ``study`` and ``label``, one row per study.

    ``label`` is ``0`` or ``1``, or ``normal`` or ``abnormal`` (any case); other columns are ignored.
    ``study`` is a study's id as the package gives it (the ``study`` column of ``evaluate``'s images
    and studies CSVs): a DICOM series' SeriesInstanceUID, or a NIfTI volume's file path. A NIfTI
    volume may also be named by its file name alone (``brain_017.nii.gz``), as long as no other
    volume of the split has that name (:func:`labels_of_studies`). A study may be listed twice with
    the same label; the file may list studies of several splits.

    Raises:
        MvfaInputError: Naming the file (and the line) if it is missing, empty, not UTF-8 CSV, lacks a
            column, gives a label other than those above, or lists a study twice with different labels.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "labels.csv"
        >>> _ = path.write_text("study,label\n1.2.840.1,abnormal\nbrain_017.nii.gz,0\n")
        >>> dict(read_study_labels(path))
        {'1.2.840.1': 1, 'brain_017.nii.gz': 0}
    """
    path = Path(path)
    where = f"Study labels file '{path}'"
    expected = "expected a header row with the columns study and label, then one row per study"
    if not path.is_file():
        msg = f"{where} does not exist."
        raise MvfaInputError(msg)
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        msg = f"{where} cannot be read as a UTF-8 CSV file ({type(error).__name__}: {error}); {expected}."
        raise MvfaInputError(msg) from error
    if not rows:
        msg = f"{where} is empty: {expected}."
        raise MvfaInputError(msg)
    (header_line, header), rows = rows[0], rows[1:]
    names = [cell.strip().lower() for cell in header]
    missing = [column for column in ("study", "label") if column not in names]
    if missing:
        msg = f"{where}, line {header_line}: the header {header} lacks the column(s) {missing}; {expected}."
        raise MvfaInputError(msg)
    if not rows:
        msg = f"{where} lists no study under its header (line {header_line}); {expected}."
        raise MvfaInputError(msg)
    study_column, label_column = names.index("study"), names.index("label")
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        cells = [cell.strip() for cell in row] + [""] * len(names)
        study, value = cells[study_column], cells[label_column]
        if not study:
            msg = f"{where}, line {line}: the study column is empty; expected a study id (a series UID, a NIfTI file)."
            raise MvfaInputError(msg)
        if value.lower() not in LABEL_VALUES:
            msg = f"{where}, line {line}: study '{study}' has the label {value!r}; expected 0, 1, normal or abnormal."
            raise MvfaInputError(msg)
        label = LABEL_VALUES[value.lower()]
        if study in labels and labels[study] != label:
            msg = (
                f"{where}, line {line}: study '{study}' is listed again with the label {value!r}, but line "
                f"{first_line[study]} gives it {labels[study]}; expected one label per study."
            )
            raise MvfaInputError(msg)
        labels.setdefault(study, label)
        first_line.setdefault(study, line)
    return StudyLabels(labels, source=where)


def labels_of_studies(studies: Iterable[str], study_labels: Mapping[str, int]) -> dict[str, int]:
    """The label of every study of ``studies`` in ``study_labels``: by its id, else (NIfTI) by its file name.

    A NIfTI study's id is its file's path; a label given for its file name alone applies where that
    name is the file name of no other study of ``studies``. Studies of ``study_labels`` that are not
    among ``studies`` are left out (a labels file may cover several splits).

    Raises:
        MvfaInputError: Naming ``study_labels``' file and the first studies it lacks, or the file
            names that several studies share.

    Example:
        >>> labels_of_studies(["1.2.3", "/data/test/brain_017.nii.gz"], {"1.2.3": 0, "brain_017.nii.gz": 1})
        {'1.2.3': 0, '/data/test/brain_017.nii.gz': 1}
    """
    source = getattr(study_labels, "source", "The study labels")
    ids = list(dict.fromkeys(str(study) for study in studies))
    names = {study: PurePath(study).name for study in ids if study.lower().endswith(NIFTI_SUFFIXES)}
    holders: dict[str, list[str]] = {}
    for study, name in names.items():
        holders.setdefault(name, []).append(study)
    found: dict[str, int] = {}
    missing, shared = [], []
    for study in ids:
        name = names.get(study)
        if study in study_labels:
            found[study] = int(study_labels[study])
        elif name is not None and name in study_labels and len(holders[name]) == 1:
            found[study] = int(study_labels[name])
        elif name is not None and name in study_labels:
            shared.append(f"'{name}' ({', '.join(holders[name])})")
        else:
            missing.append(study)
    if shared:
        listed = "; ".join(dict.fromkeys(shared))
        msg = (
            f"{source}: a label given by a NIfTI file name that several studies share: {listed}. "
            "List each of them by its path (the study column of evaluate's images CSV)."
        )
        raise MvfaInputError(msg)
    if missing:
        shown = ", ".join(f"'{study}'" for study in missing[:5]) + (", ..." if len(missing) > 5 else "")
        msg = (
            f"{source}: no label for {len(missing)} of the {len(ids)} studies: {shown}. "
            "Add a row (study,label) for each; a study's id is its DICOM SeriesInstanceUID or its NIfTI file "
            "(the study column of evaluate's images CSV)."
        )
        raise MvfaInputError(msg)
    return found


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
