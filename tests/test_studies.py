"""Study-level results: study scores, labels, thresholds and AUROC against independent computations."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from anomalib_mvfa.commands import main
from anomalib_mvfa.commands.benchmark.runner import study_auroc_of_rows
from anomalib_mvfa.commands.evaluate import ResizedItems, score_test_split, split_study_results
from anomalib_mvfa.data import MedicalAD, ScanReader
from anomalib_mvfa.errors import MvfaInputError
from anomalib_mvfa.studies import fit_study_threshold, study_auroc, study_results

from .dicom_series import write_ct_series, write_png_masks
from .test_evaluation import TINY
from .test_report_page import decoded, resized_slice, slice_cells


def _random_studies(seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    studies, labels = [], []
    for index in range(12):
        slices = int(rng.integers(1, 9))
        studies += [f"study{index}"] * slices
        labels += list(rng.integers(0, 2, slices) * (index % 2))  # odd studies hold abnormal slices
    return studies, rng.normal(size=len(studies)), np.array(labels)


@pytest.mark.parametrize(("method", "k"), [("max", 3), ("top_k_mean", 3), ("mean", 3), ("top_k_mean", 1)])
def test_study_scores_and_labels_against_an_independent_computation(method, k) -> None:
    studies, scores, labels = _random_studies(0)
    results = study_results(studies, scores, labels, names=[f"s{i}" for i in range(len(scores))], method=method, k=k)
    names = sorted(set(studies), key=studies.index)
    assert [result.study for result in results] == names
    for result in results:
        mine = np.array([study == result.study for study in studies])
        values = np.sort(scores[mine])[::-1]
        expected = {"max": values[0], "mean": values.mean(), "top_k_mean": values[:k].mean()}[method]
        assert result.score == pytest.approx(expected, abs=1e-12)
        assert result.slices == mine.sum()
        assert result.label == int(labels[mine].max())
        assert result.top_name == f"s{np.flatnonzero(mine)[np.argmax(scores[mine])]}"
    expected_auroc = roc_auc_score([result.label for result in results], [result.score for result in results])
    assert study_auroc(results) == pytest.approx(expected_auroc, abs=1e-6)  # float32, as torchmetrics computes it


def test_the_study_threshold_is_the_f1_optimum_and_decides_studies() -> None:
    studies, scores, labels = _random_studies(1)
    results = study_results(studies, scores, labels)
    threshold = fit_study_threshold(results)
    truth = [result.label for result in results]
    study_scores = np.array([result.score for result in results])
    best = max(f1_score(truth, study_scores > candidate) for candidate in [*study_scores, study_scores.min() - 1])
    assert f1_score(truth, study_scores > threshold) == pytest.approx(best)
    decided = study_results(studies, scores, labels, threshold=threshold)
    assert [result.decision for result in decided] == [int(score > threshold) for score in study_scores]
    assert study_auroc(study_results(["a", "a"], [0.1, 0.2], [0, 0])) is None  # one class only


def test_bad_study_settings_are_refused() -> None:
    with pytest.raises(MvfaInputError, match="study_score"):
        study_results(["a"], [0.1], method="median")
    with pytest.raises(MvfaInputError, match="k "):
        study_results(["a"], [0.1], method="top_k_mean", k=0)


def _series_category(root: Path) -> Path:
    rng = np.random.default_rng(7)
    base = root / "CT_AD"
    for split in ("valid", "test"):
        for index in range(2):
            write_ct_series(base / split / "good" / "img", rng, slices=3)
            series = write_ct_series(base / split / "Ungood" / "img", rng, slices=3, lesions=(index,))
            write_png_masks(series, base / split / "Ungood" / "anomaly_mask")
    return root


def evaluate_rows(output: Path) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, str]]:
    """The per-image rows, the per-study rows and the one run row of a 1-shot ``evaluate`` run's folder."""

    def rows(name: str) -> list[dict[str, str]]:
        with (output / f"few-shot_1shot_{name}.csv").open() as file:
            return list(csv.DictReader(file))

    (run,) = rows("runs")
    return rows("images"), rows("studies"), run


def test_evaluate_reports_study_auroc_of_dicom_series(tmp_path) -> None:
    root = _series_category(tmp_path / "data")
    code = main([
        "evaluate", "--root", str(root), "--categories", "CT", "--k-shot", "1", "--epochs", "0", *TINY,
        "--feature-pipeline", "clip", "--output", str(tmp_path / "out"), "--study-score", "top_k_mean",
        "--study-k", "2",
    ])  # fmt: skip
    assert code == 0
    latest = tmp_path / "out" / "latest"
    table = (latest / "few-shot_1shot.md").read_text()
    assert "| dataset | ours AC | ours AS | ours study_AUROC | authors AC | authors AS | authors study_AUROC |" in table
    assert "study_AUROC: AUROC of the study scores (top_k_mean, k=2 of the slice scores)" in table
    images, studies, run = evaluate_rows(latest)
    assert len(images) == 12
    assert len(studies) == 4
    # independent: top-2 mean of each series' slice scores, AUROC with scikit-learn
    expected = {}
    for study in {row["study"] for row in images}:
        values = sorted((float(row["score_ours"]) for row in images if row["study"] == study), reverse=True)
        labels = [int(row["label"]) for row in images if row["study"] == study]
        expected[study] = (np.mean(values[:2]), max(labels))
    for row in studies:
        assert float(row["score_ours"]) == pytest.approx(expected[row["study"]][0], rel=1e-6)
        assert int(row["label"]) == expected[row["study"]][1]
        assert int(row["decision_ours"]) == int(float(row["score_ours"]) > float(row["threshold_ours"]))
    auroc = roc_auc_score([label for _, label in expected.values()], [score for score, _ in expected.values()])
    assert float(run["ours_study_AUROC"]) == pytest.approx(100 * auroc, abs=1e-6)
    assert f"{100 * auroc:.2f}" in next(line for line in table.splitlines() if line.startswith("| CT"))
    page = (latest / "few-shot_1shot_report.html").read_text()
    assert "Studies: one row per test volume" in page
    assert all(row["study"] in page and Path(row["top_slice_ours"]).name in page for row in studies)
    # each study's row shows its highest slice: the picture is half that slice (read here with the run's reader,
    # MedicalAD's default) under the map, so less that half it is the map alone, the smoothest of all test slices'
    cells = slice_cells(latest / "few-shot_1shot_report.html")
    assert [cell["caption"] for cell in cells] == [Path(row["top_slice_ours"]).name for row in studies]
    files = [row["file"] for row in images]
    slices = {file: resized_slice(ScanReader(), file) for file in files}
    for cell, row in zip(cells, studies, strict=True):
        shown = decoded(cell["png"])
        roughness = {}
        for file, image in slices.items():
            rest = shown - 0.5 * image
            roughness[file] = np.abs(np.diff(rest, axis=0)).mean() + np.abs(np.diff(rest, axis=1)).mean()
        top = roughness.pop(row["top_slice_ours"])
        assert top < 0.85 * min(roughness.values()), (top, sorted(roughness.values())[:2])  # measured 0.70 at most


def test_benchmark_rows_get_their_study_and_the_study_auroc() -> None:
    studies, scores, labels = _random_studies(2)
    names = [f"scan{i}.dcm" for i in range(len(studies))]
    slices = list(range(len(studies)))
    samples = pd.DataFrame({"image_path": names, "study": studies, "slice": slices})
    datamodule = SimpleNamespace(test_data=SimpleNamespace(samples=samples))
    rows = [
        {"file": name, "score": float(score), "label": int(label)}
        for name, score, label in zip(names, scores, labels, strict=True)
    ]
    auroc, reason = study_auroc_of_rows(rows, datamodule)
    assert reason is None
    assert [(row["study"], row["slice"]) for row in rows] == list(zip(studies, slices, strict=True))
    owner = np.array(studies)
    highest = {study: scores[owner == study].max() for study in set(studies)}
    truth = {study: labels[owner == study].max() for study in set(studies)}
    assert auroc == pytest.approx(roc_auc_score(list(truth.values()), [highest[s] for s in truth]), abs=1e-6)
    # 2D images only: no study AUROC, and no reason either (not applicable)
    flat = pd.DataFrame({"image_path": names, "study": names, "slice": [0] * len(names)})
    flat_module = SimpleNamespace(test_data=SimpleNamespace(samples=flat))
    assert study_auroc_of_rows(rows, flat_module) == (None, None)


class _MeanScorer:
    """A stand-in model whose score of an image is its mean intensity (and whose map is the image)."""

    image_size = 64

    def eval(self) -> None:
        """Nothing to switch."""

    def score_images(self, images):
        grey = images.mean(dim=1)
        score = grey.flatten(1).mean(dim=1)
        branches = SimpleNamespace(zero_shot_score=score, zero_shot_map=grey, few_shot_score=None, few_shot_map=None)
        return SimpleNamespace(branches=branches, pred_score=score, anomaly_map=grey)


def test_the_study_threshold_of_evaluate_is_fitted_on_the_validation_studies(tmp_path) -> None:
    root = _series_category(tmp_path / "data")
    datamodule = MedicalAD(root=root, category="CT", num_workers=0)
    datamodule.setup()
    model = _MeanScorer()
    args = SimpleNamespace(study_score="max", study_k=3, batch_size=4)
    scores = score_test_split(model, datamodule, 4)
    studies = split_study_results(args, model, datamodule, scores)

    def fitted(split):  # independent: each item's mean, the highest of each series, F1 over thresholds
        dataset = ResizedItems(getattr(datamodule, f"{split}_data"), 64)
        items = [dataset[index] for index in range(len(dataset))]
        table = getattr(datamodule, f"{split}_data").samples
        by_study = {}
        for item, study in zip(items, table.study, strict=True):
            score, label = float(item.image.mean()), int(item.gt_label)
            best, truth = by_study.get(study, (-np.inf, 0))
            by_study[study] = (max(best, score), max(truth, label))
        values = np.array([score for score, _ in by_study.values()])
        truth = [label for _, label in by_study.values()]
        f1 = [f1_score(truth, values > candidate) for candidate in np.sort(values)]
        return float(np.sort(values)[int(np.argmax(f1))])

    assert studies["threshold"] == pytest.approx(fitted("val"), rel=1e-5)
    assert fitted("val") != pytest.approx(fitted("test"), rel=1e-5)  # the test split would give another one
    assert [result.decision for result in studies["ours"]] == [
        int(result.score > studies["threshold"]) for result in studies["ours"]
    ]
