"""ROC and precision-recall curves against scikit-learn and against computations written here."""

from __future__ import annotations

import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from anomalib_mvfa.reports.curves import (
    CurvePlot,
    CurveSeries,
    area,
    curve_points,
    legend_labels,
    plot_curves,
    seed_band,
    write_curve_points,
    write_curves,
)

EXACT = 1e-6  # exact points: only float rounding (torchmetrics' rates are float32) separates us from sklearn


def scored(count: int, seed: int, positive_rate: float = 0.3, ties: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that separate the classes imperfectly; rounded to 0.05 (many ties) unless ``ties`` is False."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(count, generator=generator) < positive_rate).long()
    scores = torch.randn(count, generator=generator) + 1.2 * targets
    if ties:
        scores = (scores * 20).round() / 20
    return scores, targets


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    order = np.lexsort((y, x))  # by fpr, then tpr: the ROC curve's own order
    x, y = x[order], y[order]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def step_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """sum over increasing recall of (r_i - r_{i-1}) * p_i, p_i the best precision reaching r_i."""
    total, previous = 0.0, 0.0
    for value in np.unique(recall):
        total += (value - previous) * np.nan_to_num(precision[recall == value]).max()
        previous = value
    return total


def roc_envelope(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """np.interp on the highest tpr of each distinct fpr."""
    distinct = np.unique(fpr)
    highest = np.array([tpr[fpr == value].max() for value in distinct])
    return np.interp(grid, distinct, highest)


def interpolated_precision(recall: np.ndarray, precision: np.ndarray, grid: np.ndarray) -> np.ndarray:
    return np.array([precision[recall >= value].max() if (recall >= value).any() else 0.0 for value in grid])


def test_exact_roc_points_are_sklearns_with_ties() -> None:
    scores, targets = scored(500, seed=0)
    assert scores.unique().numel() < 200  # plenty of ties
    fpr, tpr, thresholds = curve_points(scores, targets, "roc")
    expected = roc_auc_score(targets.numpy(), scores.numpy())
    assert trapezoid(fpr.double().numpy(), tpr.double().numpy()) == pytest.approx(expected, abs=EXACT)
    assert area(fpr, tpr, "roc") == pytest.approx(expected, abs=EXACT)
    # every distinct score is a threshold, with sklearn's points at it (sklearn's first threshold is inf too)
    sk_fpr, sk_tpr, sk_thresholds = roc_curve(targets.numpy(), scores.numpy(), drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr, atol=EXACT)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr, atol=EXACT)
    np.testing.assert_array_equal(thresholds.numpy(), sk_thresholds.astype(np.float32))


def test_pr_area_is_sklearns_average_precision() -> None:
    scores, targets = scored(400, seed=1)
    recall, precision, thresholds = curve_points(scores, targets, "pr")
    expected = average_precision_score(targets.numpy(), scores.numpy())
    assert area(recall, precision, "pr") == pytest.approx(expected, abs=EXACT)
    assert step_average_precision(recall.double().numpy(), precision.double().numpy()) == pytest.approx(
        expected, abs=EXACT
    )
    # area takes points in any order
    shuffled = torch.randperm(recall.numel(), generator=torch.Generator().manual_seed(0))
    assert area(recall[shuffled], precision[shuffled], "pr") == pytest.approx(expected, abs=EXACT)
    # each point's precision and recall are those of "score >= threshold", counted here
    for index in range(0, thresholds.numel() - 1, 37):
        flagged = scores >= thresholds[index]
        true_positives = int((flagged & (targets == 1)).sum())
        assert float(precision[index]) == pytest.approx(true_positives / int(flagged.sum()), abs=EXACT)
        assert float(recall[index]) == pytest.approx(true_positives / int(targets.sum()), abs=EXACT)


def test_quantile_thresholds_on_many_values_stay_close_to_the_exact_auroc() -> None:
    scores, targets = scored(200_000, seed=2, positive_rate=0.5, ties=False)
    fpr, tpr, thresholds = curve_points(scores, targets, "roc", max_thresholds=1000)
    assert fpr.numel() <= 1001  # 1000 thresholds and the (0, 0) point
    assert torch.isin(thresholds[1:], scores).all()  # the thresholds are scores (quantiles of them)
    # Between two consecutive of the 1000 quantile thresholds lie 200 scores, so tpr rises at most by
    # 200 / 100k positives = 2e-3 per segment; the chord of a segment misses at most half of
    # (its fpr step x its tpr step), which sums to at most 2e-3 / 2 = 1e-3 over fpr in [0, 1].
    expected = roc_auc_score(targets.numpy(), scores.numpy())
    assert trapezoid(fpr.double().numpy(), tpr.double().numpy()) == pytest.approx(expected, abs=2e-3)


def test_quantile_points_are_torchmetrics_binned_points_at_those_thresholds() -> None:
    scores, targets = scored(60_000, seed=3)
    for kind in ("roc", "pr"):
        x, y, thresholds = curve_points(scores, targets, kind, max_thresholds=300)
        finite = thresholds[torch.isfinite(thresholds)].double()
        assert 50 < finite.numel() <= 300
        # torchmetrics' own binned computation, given the same thresholds (scores mapped to [0, 1])
        low, high = scores.double().min(), scores.double().max()
        preds, bins = (scores.double() - low) / (high - low), ((finite - low) / (high - low)).sort().values
        if kind == "roc":
            expected_x, expected_y, _ = binary_roc(preds, targets, thresholds=bins)
            x, y = x[1:], y[1:]  # our extra (0, 0) point, above every threshold
        else:
            expected_y, expected_x, _ = binary_precision_recall_curve(preds, targets, thresholds=bins)
        torch.testing.assert_close(x, expected_x, atol=0, rtol=0)
        torch.testing.assert_close(y, expected_y, atol=0, rtol=0)


@pytest.mark.parametrize("shift", [-50.0, 0.0, 300.0])
def test_scores_of_any_range_give_sklearns_areas(shift: float) -> None:
    scores, targets = scored(300, seed=4)
    scores = (scores - scores.mean()) / scores.std() * 40 + shift  # z-scores far outside [0, 1]
    for kind, reference in (("roc", roc_auc_score), ("pr", average_precision_score)):
        x, y, thresholds = curve_points(scores, targets, kind)
        assert area(x, y, kind) == pytest.approx(reference(targets.numpy(), scores.numpy()), abs=EXACT)
        assert set(thresholds[torch.isfinite(thresholds)].tolist()) == set(scores.tolist())


def test_seed_band_is_the_mean_and_std_of_the_seeds_interpolated_curves() -> None:
    grid = np.linspace(0, 1, 101)
    for kind, interpolate in (("roc", roc_envelope), ("pr", interpolated_precision)):
        points = []
        for seed in (5, 6):
            x, y, _ = curve_points(*scored(120, seed=seed), kind)
            points.append((x, y))
        band_grid, mean, std = seed_band(points, kind, grid_size=101)
        seeds = np.stack([interpolate(x.double().numpy(), y.double().numpy(), grid) for x, y in points])
        np.testing.assert_allclose(band_grid.numpy(), grid, atol=1e-12)
        np.testing.assert_allclose(mean.numpy(), seeds.mean(axis=0), atol=1e-9)
        np.testing.assert_allclose(std.numpy(), seeds.std(axis=0, ddof=1), atol=1e-9)
        assert std.max() > 0.01  # the seeds do differ

        _, one_mean, one_std = seed_band(points[:1], kind, grid_size=101)
        np.testing.assert_allclose(one_mean.numpy(), seeds[0], atol=1e-9)
        assert torch.equal(one_std, torch.zeros(101, dtype=torch.float64))


def two_series_plot(level: str = "image", category: str = "Brain") -> CurvePlot:
    series = []
    for name, offset in (("ours", 0), ("authors", 10)):
        seeds = [0, 1]
        data = [scored(150, seed=offset + seed + (20 if level == "pixel" else 0)) for seed in seeds]
        series.append(CurveSeries(name, seeds, [s for s, _ in data], [t for _, t in data]))
    return CurvePlot(category, level, series)


def test_plot_curves_writes_a_png_and_labels_each_series_with_its_area(tmp_path) -> None:
    plot = two_series_plot()
    single = CurvePlot(
        "Brain", "image", [CurveSeries("one seed", [0], plot.series[0].scores[:1], plot.series[0].targets[:1])]
    )
    for kind, reference in (("roc", roc_auc_score), ("pr", average_precision_score)):
        path = plot_curves(plot, kind, tmp_path / "deep" / f"brain_{kind}.png")
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 300
            assert image.height > 300
            low, high = image.convert("L").getextrema()
            assert high - low > 100  # something is drawn
        labels = legend_labels(plot, kind)
        assert len(labels) == 2
        for label, series in zip(labels, plot.series, strict=True):
            areas = [reference(t.numpy(), s.numpy()) for s, t in zip(series.scores, series.targets, strict=True)]
            assert label.startswith(series.name)
            assert f"{statistics.fmean(areas):.3f} ± {statistics.stdev(areas):.3f}" in label
        (label,) = legend_labels(single, kind)
        expected = reference(single.series[0].targets[0].numpy(), single.series[0].scores[0].numpy())
        assert f"{expected:.3f}" in label
        assert "±" not in label
        assert plot_curves(single, kind, tmp_path / f"single_{kind}.png").stat().st_size > 5000


def test_curve_points_file_holds_every_seeds_points(tmp_path) -> None:
    plots = [two_series_plot("image"), two_series_plot("pixel")]
    path = write_curve_points(plots, tmp_path / "points.csv")
    table = pd.read_csv(path)
    assert list(table.columns) == ["category", "level", "kind", "series", "seed", "x", "y", "threshold"]
    groups = table.groupby(["category", "level", "kind", "series", "seed"])
    expected_keys = {
        (plot.category, plot.level, kind, series.name, seed)
        for plot in plots
        for kind in ("roc", "pr")
        for series in plot.series
        for seed in series.seeds
    }
    assert set(groups.groups) == expected_keys
    for plot in plots:
        for series in plot.series:
            for seed, scores, targets in zip(series.seeds, series.scores, series.targets, strict=True):
                roc = groups.get_group((plot.category, plot.level, "roc", series.name, seed))
                pr = groups.get_group((plot.category, plot.level, "pr", series.name, seed))
                assert trapezoid(roc.x.to_numpy(), roc.y.to_numpy()) == pytest.approx(
                    roc_auc_score(targets.numpy(), scores.numpy()), abs=EXACT
                )
                assert step_average_precision(pr.x.to_numpy(), pr.y.to_numpy()) == pytest.approx(
                    average_precision_score(targets.numpy(), scores.numpy()), abs=EXACT
                )
                assert np.isinf(roc.threshold.iloc[0])
                assert np.isinf(pr.threshold.iloc[-1])


def test_write_curves_names_files_by_category_and_level(tmp_path) -> None:
    plots = [two_series_plot("image", "Brain/MRI"), two_series_plot("pixel", "Brain/MRI")]
    images = write_curves(plots, tmp_path / "curves")
    names = ["Brain_MRI_image_roc.png", "Brain_MRI_image_pr.png", "Brain_MRI_pixel_roc.png", "Brain_MRI_pixel_pr.png"]
    assert [image.name for image in images] == names
    assert all(image.parent == tmp_path / "curves" and image.stat().st_size > 5000 for image in images)
    assert len(pd.read_csv(tmp_path / "curves" / "curves.csv")) > 0
    assert not [file for file in (tmp_path / "curves").iterdir() if file.name.startswith(".")]  # no temporary left
    with pytest.raises(ValueError, match="would both be written"):
        write_curves([plots[0], two_series_plot("image", "Brain MRI")], tmp_path / "clash")


def test_one_class_seeds_are_left_out_and_said_so(tmp_path) -> None:
    scores, targets = scored(100, seed=7)
    normal_only = torch.zeros(100, dtype=torch.long)
    plot = CurvePlot(
        "Liver",
        "pixel",
        [
            CurveSeries("mixed", [0, 1], [scores, scores], [targets, normal_only]),
            CurveSeries("flat", [0, 1], [scores, scores], [normal_only, torch.ones(100, dtype=torch.long)]),
        ],
    )
    for kind in ("roc", "pr"):
        mixed, flat = legend_labels(plot, kind)
        assert flat == "flat (undefined: one class only)"
        reference = roc_auc_score if kind == "roc" else average_precision_score
        assert f"{reference(targets.numpy(), scores.numpy()):.3f} (1 of 2 seeds; 1 with one class only)" in mixed
        assert plot_curves(plot, kind, tmp_path / f"{kind}.png").is_file()
    table = pd.read_csv(write_curve_points([plot], tmp_path / "points.csv"))
    assert set(zip(table.series, table.seed, strict=True)) == {("mixed", 0)}
    with pytest.raises(ValueError, match="undefined"):
        curve_points(scores, normal_only, "roc")


def test_bad_inputs_raise_naming_what_is_wrong(tmp_path) -> None:
    scores, targets = scored(50, seed=8)
    mismatched = CurvePlot("Brain", "image", [CurveSeries("ours", [0, 3], [scores, scores], [targets, targets[:-1]])])
    with pytest.raises(ValueError, match=r"series 'ours'.*seed 3: 50 scores but 49 targets"):
        plot_curves(mismatched, "roc", tmp_path / "x.png")
    with pytest.raises(ValueError, match="series 'ours'"):
        write_curve_points([mismatched], tmp_path / "x.csv")
    with pytest.raises(ValueError, match="50 scores but 49 targets"):
        curve_points(scores, targets[:-1], "roc")
    with pytest.raises(ValueError, match="Kidney"):
        plot_curves(CurvePlot("Kidney", "image", []), "pr", tmp_path / "x.png")
    with pytest.raises(ValueError, match="not finite"):
        curve_points(torch.cat([scores[:-1], torch.tensor([float("nan")])]), targets, "pr")
    infinite = CurveSeries("ours", [0], [torch.cat([scores[:-1], torch.tensor([float("inf")])])], [targets])
    with pytest.raises(ValueError, match="not finite"):
        legend_labels(CurvePlot("Brain", "image", [infinite]), "roc")
    with pytest.raises(ValueError, match=r"0 \(normal\) or 1"):
        curve_points(scores, targets * 2, "roc")
    assert not list(tmp_path.iterdir())  # nothing half-written
