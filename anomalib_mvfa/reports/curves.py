"""ROC and precision-recall curves of anomaly scores, per category and level, as PNG and as points.

A plot (:class:`CurvePlot`) is one category at one level (``image`` or ``pixel``) with several
named series overlaid (:class:`CurveSeries`: a fusion such as ``ours`` / ``authors``, or a model
such as ``Mvfa`` / ``Patchcore``). A series holds the scores and binary targets of one or more
seeds; one seed is drawn as its curve, several as their mean and a shaded ± std band.

The curves are torchmetrics' (:func:`~torchmetrics.functional.classification.binary_roc`,
:func:`~torchmetrics.functional.classification.binary_precision_recall_curve`) and the legend's
areas its AUROC and average precision. Scores of any range are ranked first: torchmetrics passes
scores outside [0, 1] through a sigmoid, which in float32 makes large z-scores tie at 1.0.

Targets of one class only (no abnormal image, or a mask without an abnormal pixel) leave ROC and
average precision undefined: such a seed is left out of the band, the legend's area and the
points file; a series without any other seed is drawn as nothing and labelled
``(undefined: one class only)``.

Example:
    >>> series = CurveSeries("ours", [0], [torch.tensor([0.1, 0.4, 0.35, 0.8])], [torch.tensor([0, 0, 1, 1])])
    >>> legend_labels(CurvePlot("Brain", "image", [series]), "roc")
    ['ours: AUROC 0.750']
    >>> write_curves([CurvePlot("Brain", "image", [series])], Path("curves"))  # doctest: +SKIP
    [PosixPath('curves/Brain_image_roc.png'), PosixPath('curves/Brain_image_pr.png')]
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from ..errors import MvfaInputError
from ..metrics import undefined_auroc_reason
from ..utils import csv_cell, write_atomically

CurveKind = Literal["roc", "pr"]
Level = Literal["image", "pixel"]

KINDS: tuple[CurveKind, ...] = ("roc", "pr")
LEVELS: tuple[Level, ...] = ("image", "pixel")
AREA_NAMES = {"roc": "AUROC", "pr": "AP"}
TITLES = {"roc": "ROC", "pr": "precision-recall"}
AXIS_LABELS = {"roc": ("False positive rate", "True positive rate"), "pr": ("Recall", "Precision")}
CSV_COLUMNS = ("category", "level", "kind", "series", "seed", "x", "y", "threshold")
UNDEFINED = "undefined: one class only"

FIGURE_SIZE = (6.0, 5.0)
FIGURE_DPI = 120
BAND_ALPHA = 0.2


@dataclass
class CurveSeries:
    """One named series of a plot: per seed, the scores and binary targets (1-D tensors).

    Example:
        >>> CurveSeries("ours", [0], [torch.tensor([0.2, 0.9])], [torch.tensor([0, 1])]).seeds
        [0]
    """

    name: str
    seeds: list[int]
    scores: list[Tensor]  # one 1-D float tensor per seed
    targets: list[Tensor]  # one 1-D {0,1} tensor per seed, same length as its scores


@dataclass
class CurvePlot:
    """Everything one figure shows: a category, a level and its series.

    Example:
        >>> CurvePlot("Brain", "image", []).level
        'image'
    """

    category: str
    level: Literal["image", "pixel"]
    series: list[CurveSeries]


@dataclass
class _Ranked:
    """One seed's checked scores as dense ranks in [0, 1], what torchmetrics is given."""

    values: Tensor  # the distinct scores, ascending
    counts: Tensor  # how many scores hold each distinct value
    preds: Tensor  # rank / (distinct values - 1), float64, one per score
    targets: Tensor  # long, {0, 1}


@dataclass
class _SeriesCurves:
    """What one series shows on a plot of one kind: the defined seeds' points and areas."""

    name: str
    kind: CurveKind
    seed_count: int
    seeds: list[int] = field(default_factory=list)
    points: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)
    areas: list[float] = field(default_factory=list)
    positive_rates: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The legend's label: the name and the area, mean ± std over the defined seeds."""
        if not self.areas:
            return f"{self.name} ({UNDEFINED})"
        label = f"{self.name}: {AREA_NAMES[self.kind]} {statistics.fmean(self.areas):.3f}"
        if len(self.areas) > 1:
            label += f" ± {statistics.stdev(self.areas):.3f}"
        if len(self.areas) < self.seed_count:
            skipped = self.seed_count - len(self.areas)
            label += f" ({len(self.areas)} of {self.seed_count} seeds; {skipped} with one class only)"
        return label


def curve_points(
    scores: Tensor, targets: Tensor, kind: CurveKind, max_thresholds: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The points of one curve: ROC -> ``(fpr, tpr, thresholds)``, PR -> ``(recall, precision, thresholds)``.

    Exact (every distinct score is a threshold) when ``max_thresholds`` is ``None`` or
    ``scores.numel() <= max_thresholds``; otherwise the points at ``max_thresholds`` thresholds
    (fewer where quantiles tie) at evenly spaced quantiles of the scores, min and max included.
    Those points are taken from torchmetrics' exact curve: they equal what torchmetrics computes
    when given them as a ``thresholds`` tensor, at O(N log N) instead of O(N x thresholds).

    A point is "flagged abnormal when score >= threshold". Points come in torchmetrics' order:
    ROC from (0, 0) with rising thresholds' reverse, PR ending at (recall 0, precision 1). The
    threshold of that "nothing flagged" point (the first of ROC, the last of PR) is ``inf``.
    ``x`` and ``y`` are torchmetrics' dtype (float32), thresholds the scores' dtype.

    Args:
        scores: Anomaly scores of any finite range (any shape; flattened).
        targets: 0 normal, 1 abnormal (bool, integer or float), as many as ``scores``.
        kind: ``"roc"`` or ``"pr"``.
        max_thresholds: Most thresholds on large inputs (at least 2), ``None`` for exact points.

    Raises:
        ValueError: Unknown ``kind``, mismatched lengths, non-finite scores, targets other than 0
            and 1, targets of one class only (the curve is undefined), ``max_thresholds < 2``.

    Example:
        >>> fpr, tpr, thresholds = curve_points(torch.tensor([-1.0, 2.0, 0.5]), torch.tensor([0, 1, 1]), "roc")
        >>> fpr.tolist(), tpr.tolist(), thresholds.tolist()
        ([0.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 1.0], [inf, 2.0, 0.5, -1.0])
    """
    _check_kind(kind)
    if max_thresholds is not None and max_thresholds < 2:
        msg = f"max_thresholds must be at least 2 (or None for exact points), got {max_thresholds}"
        raise MvfaInputError(msg)
    ranked = _ranked(*_checked(scores, targets, "scores"))
    reason = undefined_auroc_reason(ranked.targets, f"the {TITLES[kind]} curve")
    if reason is not None:
        raise MvfaInputError(reason)
    return _points(ranked, kind, max_thresholds)


def area(x: Tensor | Sequence[float], y: Tensor | Sequence[float], kind: CurveKind) -> float:
    """The area under curve points, in any order.

    ROC: the trapezoid rule over the points sorted by (fpr, tpr); on exact points it equals the
    AUROC. PR: the step-wise average precision ``sum((r_i - r_{i-1}) * p_i)`` over increasing
    recall, ``p_i`` the highest precision at recall ``r_i`` (the point of the highest threshold),
    as torchmetrics and scikit-learn compute it; NaN precision counts as 0.

    Example:
        >>> area(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]), "roc")
        1.0
        >>> area(torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 1.0]), "pr")
        0.75
    """
    _check_kind(kind)
    x_values = torch.as_tensor(x, dtype=torch.float64).flatten()
    y_values = torch.nan_to_num(torch.as_tensor(y, dtype=torch.float64).flatten(), nan=0.0)
    if x_values.numel() != y_values.numel():
        msg = f"x and y have different lengths: {x_values.numel()} and {y_values.numel()}"
        raise MvfaInputError(msg)
    if x_values.numel() < 2:
        return 0.0
    # sort by x, ties by y: ascending for ROC (the curve's own order), descending for PR (highest precision first)
    order = torch.argsort(y_values, stable=True, descending=kind == "pr")
    order = order[torch.argsort(x_values[order], stable=True)]
    x_values, y_values = x_values[order], y_values[order]
    if kind == "roc":
        return float(torch.trapezoid(y_values, x_values))
    return float(((x_values[1:] - x_values[:-1]) * y_values[1:]).sum())


def seed_band(
    points: list[tuple[Tensor, Tensor]], kind: CurveKind, grid_size: int = 201
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and std over seeds of ``y`` interpolated on a common ``x`` grid in [0, 1]: ``(grid, mean, std)``.

    ROC: tpr at each grid fpr, linearly interpolated on the step-wise upper envelope of a seed's
    points (the highest tpr at each distinct fpr), as scikit-learn's examples of ROC bands do.
    PR: the interpolated precision at each grid recall ``r``, the highest precision at recall
    ``>= r`` (0 beyond the seed's largest recall). ``std`` is the sample standard deviation (as the
    package's tables report it), 0 with one seed. All three are float64.

    Example:
        >>> grid, mean, std = seed_band([(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]))], "roc", 3)
        >>> grid.tolist(), mean.tolist(), std.tolist()
        ([0.0, 0.5, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    _check_kind(kind)
    if not points:
        msg = "seed_band needs the points of at least one seed"
        raise MvfaInputError(msg)
    if grid_size < 2:
        msg = f"grid_size must be at least 2, got {grid_size}"
        raise MvfaInputError(msg)
    grid = torch.linspace(0, 1, grid_size, dtype=torch.float64)
    interpolate = _roc_envelope_at if kind == "roc" else _interpolated_precision_at
    values = torch.stack([interpolate(*_as_float64(x, y), grid) for x, y in points])
    std = values.std(dim=0) if len(points) > 1 else torch.zeros_like(grid)
    return grid, values.mean(dim=0), std


def legend_labels(plot: CurvePlot, kind: CurveKind, max_thresholds: int | None = None) -> list[str]:
    """The legend labels of ``plot_curves(plot, kind, ...)``'s series, in series order.

    A label is ``"<name>: AUROC 0.912 ± 0.013"`` (``AP`` for PR; no ``±`` with one seed): the exact
    metric (torchmetrics' ``binary_auroc`` / ``binary_average_precision`` over all scores, whatever
    ``max_thresholds``), mean ± sample std over the seeds with two classes. Seeds with one class
    only are counted in a note, ``"(2 of 3 seeds; 1 with one class only)"``; a series with no
    other seed is ``"<name> (undefined: one class only)"``. The legend's chance line is not listed.

    Example:
        >>> targets = [torch.tensor([0, 1]), torch.tensor([1, 1])]  # the second seed: abnormal only
        >>> series = CurveSeries("ours", [0, 1], [torch.tensor([0.2, 0.9])] * 2, targets)
        >>> legend_labels(CurvePlot("Brain", "image", [series]), "pr")
        ['ours: AP 1.000 (1 of 2 seeds; 1 with one class only)']
    """
    return [curves.label for curves in _plot_curves_data(plot, (kind,), max_thresholds)[kind]]


def plot_curves(plot: CurvePlot, kind: CurveKind, path: Path, max_thresholds: int | None = None) -> Path:
    """Draw every series of ``plot`` on one figure and save it as a PNG at ``path`` (folders made).

    One seed: the curve itself (PR as steps). Several: the mean line and a shaded ± std band (see
    :func:`seed_band`). The legend gives each series' name and area (:func:`legend_labels`). The
    title reads ``"Brain, image level ROC"``; ROC shows the diagonal chance line, PR a horizontal line
    at the positive rate (mean over the drawn seeds). Written atomically; drawn with
    :class:`matplotlib.figure.Figure` (no pyplot, no global state).

    Raises:
        ValueError: ``plot`` has no series, or a series' seeds, scores and targets do not match
            (named in the message), or scores are not finite.

    Example:
        >>> plot_curves(plot, "roc", Path("curves/Brain_image_roc.png"))  # doctest: +SKIP
        PosixPath('curves/Brain_image_roc.png')
    """
    return _draw(plot, kind, _plot_curves_data(plot, (kind,), max_thresholds)[kind], Path(path))


def write_curve_points(plots: list[CurvePlot], path: Path, max_thresholds: int | None = None) -> Path:
    """One CSV of every point behind every plot, both kinds of each: written atomically to ``path``.

    Columns: ``category, level, kind, series, seed, x, y, threshold`` (``x, y`` = fpr, tpr for
    ``roc``; recall, precision for ``pr``; see :func:`curve_points` for the points, their order and
    the ``inf`` threshold). Seeds with one class only have no rows.

    Example:
        >>> write_curve_points([plot], Path("curves/curves.csv"))  # doctest: +SKIP
        PosixPath('curves/curves.csv')
    """
    frames = [_points_frame(plot, _plot_curves_data(plot, KINDS, max_thresholds)) for plot in plots]
    return _write_frame(frames, Path(path))


def write_curves(plots: list[CurvePlot], folder: Path, max_thresholds: int | None = 100_000) -> list[Path]:
    """Every plot's ROC and PR figure, ``<folder>/<category>_<level>_roc.png`` and ``..._pr.png``, and ``curves.csv``.

    The category is made file-name safe (characters other than letters, digits, ``.``, ``_`` and
    ``-`` become ``_``). Each seed's curves are computed once for both the figures and
    ``<folder>/curves.csv`` (:func:`write_curve_points`).

    Returns:
        The PNG paths in plot order: ``[roc, pr, roc, pr, ...]``.

    Raises:
        ValueError: Two plots would share a file name (same safe category and level), or see
            :func:`plot_curves`.

    Example:
        >>> write_curves([CurvePlot("Brain", "image", [series])], Path("curves"))  # doctest: +SKIP
        [PosixPath('curves/Brain_image_roc.png'), PosixPath('curves/Brain_image_pr.png')]
    """
    folder = Path(folder)
    stems: dict[str, CurvePlot] = {}
    for plot in plots:
        stem = f"{_safe_name(plot.category)}_{plot.level}"
        if stem in stems:
            msg = f"plots {_plot_name(stems[stem])} and {_plot_name(plot)} would both be written as {stem}_*.png"
            raise MvfaInputError(msg)
        stems[stem] = plot
    images: list[Path] = []
    frames: list[pd.DataFrame] = []
    for stem, plot in stems.items():
        data = _plot_curves_data(plot, KINDS, max_thresholds)
        images.extend(_draw(plot, kind, data[kind], folder / f"{stem}_{kind}.png") for kind in KINDS)
        frames.append(_points_frame(plot, data))
    _write_frame(frames, folder / "curves.csv")
    return images


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        msg = f"kind must be one of {KINDS}, got {kind!r}"
        raise MvfaInputError(msg)


def _checked(scores: Tensor, targets: Tensor, where: str) -> tuple[Tensor, Tensor]:
    """Flattened CPU scores and long targets, or a ValueError saying what is wrong with ``where``."""
    scores = torch.as_tensor(scores).detach().cpu().flatten()
    targets = torch.as_tensor(targets).detach().cpu().flatten()
    if scores.numel() != targets.numel():
        msg = f"{where}: {scores.numel()} scores but {targets.numel()} targets"
        raise MvfaInputError(msg)
    if not scores.is_floating_point():
        scores = scores.double()
    non_finite = int((~torch.isfinite(scores)).sum())
    if non_finite:
        msg = f"{where}: {non_finite} of {scores.numel()} scores are not finite (nan or inf)"
        raise MvfaInputError(msg)
    if targets.numel() and not bool(((targets == 0) | (targets == 1)).all()):
        msg = f"{where}: targets must be 0 (normal) or 1 (abnormal), got values {targets.unique().tolist()[:10]}"
        raise MvfaInputError(msg)
    return scores, targets.long()


def _ranked(scores: Tensor, targets: Tensor) -> _Ranked:
    """Scores as dense ranks scaled to [0, 1]: the same order and ties, no sigmoid in torchmetrics."""
    values, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    preds = inverse.double() / max(values.numel() - 1, 1)
    return _Ranked(values=values, counts=counts, preds=preds, targets=targets)


def _points(ranked: _Ranked, kind: CurveKind, max_thresholds: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact torchmetrics points of ``ranked`` (two classes), thresholds as scores; subsampled on large inputs."""
    top = ranked.values.numel() - 1
    if kind == "roc":
        x, y, rank_thresholds = binary_roc(ranked.preds, ranked.targets, validate_args=False)
        ranks = (rank_thresholds[1:] * max(top, 1)).round().long()  # the first is torchmetrics' "above all"
        thresholds = torch.cat([_infinity(ranked.values), ranked.values[ranks]])
    else:
        y, x, rank_thresholds = binary_precision_recall_curve(ranked.preds, ranked.targets, validate_args=False)
        ranks = (rank_thresholds * max(top, 1)).round().long()
        thresholds = torch.cat([ranked.values[ranks], _infinity(ranked.values)])
    count = ranked.preds.numel()
    if max_thresholds is None or count <= max_thresholds:
        return x, y, thresholds
    # the ranks at evenly spaced positions of the sorted scores: quantiles that are scores themselves
    positions = torch.linspace(0, count - 1, max_thresholds, dtype=torch.float64).round().long()
    chosen = torch.searchsorted(ranked.counts.cumsum(0), positions, right=True).unique()
    # exact points: ROC [above all, rank top, ..., rank 0], PR [rank 0, ..., rank top, above all]
    if kind == "roc":
        keep = torch.cat([torch.zeros(1, dtype=torch.long), 1 + (top - chosen).flip(0)])
    else:
        keep = torch.cat([chosen, torch.tensor([top + 1])])
    return x[keep], y[keep], thresholds[keep]


def _infinity(like: Tensor) -> Tensor:
    return torch.full((1,), float("inf"), dtype=like.dtype)


def _exact_area(ranked: _Ranked, kind: CurveKind) -> float:
    metric = binary_auroc if kind == "roc" else binary_average_precision
    return float(metric(ranked.preds, ranked.targets, validate_args=False))


def _as_float64(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.nan_to_num(torch.as_tensor(y, dtype=torch.float64).flatten(), nan=0.0)
    if x.numel() != y.numel() or x.numel() == 0:
        msg = f"a seed's x and y must be non-empty and of one length, got {x.numel()} and {y.numel()}"
        raise MvfaInputError(msg)
    return x, y


def _roc_envelope_at(fpr: Tensor, tpr: Tensor, grid: Tensor) -> Tensor:
    """Tpr at ``grid``: linear between the highest tpr of each distinct fpr, constant beyond the ends."""
    distinct, inverse = torch.unique(fpr, sorted=True, return_inverse=True)
    highest = torch.full_like(distinct, -torch.inf).scatter_reduce(0, inverse, tpr, reduce="amax")
    if distinct.numel() == 1:
        return highest.expand_as(grid).clone()
    right = torch.searchsorted(distinct, grid, right=True).clamp(1, distinct.numel() - 1)
    left = right - 1
    weight = ((grid - distinct[left]) / (distinct[right] - distinct[left])).clamp(0, 1)
    return highest[left] + weight * (highest[right] - highest[left])


def _interpolated_precision_at(recall: Tensor, precision: Tensor, grid: Tensor) -> Tensor:
    """At each grid recall ``r``: the highest precision among points of recall ``>= r`` (0 if none)."""
    order = torch.argsort(recall)
    recall, precision = recall[order], precision[order]
    best_from_here = precision.flip(0).cummax(0).values.flip(0)
    first = torch.searchsorted(recall, grid, right=False)
    padded = torch.cat([best_from_here, torch.zeros(1, dtype=best_from_here.dtype)])
    return padded[first]


def _plot_name(plot: CurvePlot) -> str:
    return f"{plot.category!r} ({plot.level} level)"


def _plot_curves_data(
    plot: CurvePlot, kinds: tuple[CurveKind, ...], max_thresholds: int | None
) -> dict[CurveKind, list[_SeriesCurves]]:
    """Per kind, every series' defined seeds with their points and exact areas (each seed ranked once)."""
    for kind in kinds:
        _check_kind(kind)
    if plot.level not in LEVELS:
        msg = f"plot {_plot_name(plot)}: level must be one of {LEVELS}"
        raise MvfaInputError(msg)
    if not plot.series:
        msg = f"plot {_plot_name(plot)} has no series to draw"
        raise MvfaInputError(msg)
    if max_thresholds is not None and max_thresholds < 2:
        msg = f"max_thresholds must be at least 2 (or None for exact points), got {max_thresholds}"
        raise MvfaInputError(msg)
    data: dict[CurveKind, list[_SeriesCurves]] = {kind: [] for kind in kinds}
    for series in plot.series:
        where = f"series {series.name!r} of plot {_plot_name(plot)}"
        if not len(series.seeds) == len(series.scores) == len(series.targets):
            msg = (
                f"{where}: {len(series.seeds)} seeds, {len(series.scores)} score tensors and "
                f"{len(series.targets)} target tensors (one of each per seed)"
            )
            raise MvfaInputError(msg)
        if not series.seeds:
            msg = f"{where} has no seeds"
            raise MvfaInputError(msg)
        curves = {kind: _SeriesCurves(series.name, kind, len(series.seeds)) for kind in kinds}
        for seed, scores, targets in zip(series.seeds, series.scores, series.targets, strict=True):
            checked = _checked(scores, targets, f"{where}, seed {seed}")
            if undefined_auroc_reason(checked[1], "") is not None:
                continue
            ranked = _ranked(*checked)
            for kind in kinds:
                curves[kind].seeds.append(seed)
                curves[kind].points.append(_points(ranked, kind, max_thresholds))
                curves[kind].areas.append(_exact_area(ranked, kind))
                curves[kind].positive_rates.append(float(ranked.targets.double().mean()))
        for kind in kinds:
            data[kind].append(curves[kind])
    return data


def _draw(plot: CurvePlot, kind: CurveKind, all_curves: list[_SeriesCurves], path: Path) -> Path:
    """Draw one kind of ``plot`` (its series' curves already computed) and save it atomically."""
    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI, layout="constrained")
    axes = figure.add_subplot()
    for curves in all_curves:
        if not curves.points:
            axes.plot([], [], label=curves.label)  # a legend entry saying why nothing is drawn
        elif len(curves.points) == 1:
            x, y, _ = curves.points[0]
            axes.plot(x.numpy(), y.numpy(), label=curves.label, drawstyle="steps-post" if kind == "pr" else "default")
        else:
            grid, mean, std = seed_band([(x, y) for x, y, _ in curves.points], kind)
            (line,) = axes.plot(grid.numpy(), mean.numpy(), label=curves.label)
            low, high = (mean - std).clamp(0, 1), (mean + std).clamp(0, 1)
            axes.fill_between(grid.numpy(), low.numpy(), high.numpy(), color=line.get_color(), alpha=BAND_ALPHA, lw=0)
    rates = [rate for curves in all_curves for rate in curves.positive_rates]
    if kind == "roc":
        axes.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="chance")
    elif rates:
        rate = statistics.fmean(rates)
        axes.axhline(rate, linestyle="--", color="gray", linewidth=1, label=f"chance (positive rate {rate:.3f})")
    x_label, y_label = AXIS_LABELS[kind]
    axes.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=x_label, ylabel=y_label)
    axes.set_title(f"{plot.category}, {plot.level} level {TITLES[kind]}")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    return write_atomically(path, lambda name: figure.savefig(name, format="png", dpi=FIGURE_DPI))


def _points_frame(plot: CurvePlot, data: dict[CurveKind, list[_SeriesCurves]]) -> pd.DataFrame:
    """The CSV rows of one plot: every defined seed's points, kind by kind."""
    frames = [
        pd.DataFrame(
            {
                "category": plot.category,
                "level": plot.level,
                "kind": kind,
                "series": curves.name,
                "seed": seed,
                "x": x.double().numpy(),
                "y": y.double().numpy(),
                "threshold": thresholds.double().numpy(),
            },
            columns=list(CSV_COLUMNS),
        )
        for kind in KINDS
        for curves in data[kind]
        for seed, (x, y, thresholds) in zip(curves.seeds, curves.points, strict=True)
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CSV_COLUMNS))


def _write_frame(frames: list[pd.DataFrame], path: Path) -> Path:
    frames = [frame for frame in frames if len(frame)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CSV_COLUMNS))
    table = table.apply(lambda column: column if pd.api.types.is_numeric_dtype(column) else column.map(csv_cell))
    return write_atomically(path, lambda name: table.to_csv(name, index=False))


def _safe_name(name: str) -> str:
    """``name`` as a file-name part: other characters than letters, digits, ``.``, ``_``, ``-`` become ``_``."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "category"


__all__ = [
    "CurveKind",
    "CurvePlot",
    "CurveSeries",
    "area",
    "curve_points",
    "legend_labels",
    "plot_curves",
    "seed_band",
    "write_curve_points",
    "write_curves",
]
