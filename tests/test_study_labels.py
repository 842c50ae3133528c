"""Study labels from a CSV file: the reader, how study ids are found, and the study results that use them."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import f1_score, roc_auc_score

from anomalib_mvfa.commands import main
from anomalib_mvfa.commands.benchmark import BenchmarkConfig
from anomalib_mvfa.commands.benchmark.runner import study_auroc_of_rows
from anomalib_mvfa.commands.evaluate import ResizedItems, score_test_split, split_study_results
from anomalib_mvfa.data import MedicalAD
from anomalib_mvfa.errors import MvfaInputError
from anomalib_mvfa.studies import (
    StudyLabels,
    fit_study_threshold,
    labels_of_studies,
    read_study_labels,
    study_auroc,
    study_results,
)

from .test_evaluation import TINY
from .test_studies import _MeanScorer, _random_studies, _series_category, evaluate_rows


def _labels_file(folder: Path, text: str, name: str = "labels.csv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _write_labels(path: Path, labels: dict[str, int], words: bool = False) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["study", "label"])
        for study, label in labels.items():
            writer.writerow([study, ("normal", "abnormal")[label] if words else label])
    return path


# ------------------------------------------------------------------------------------------ reader


def test_the_reader_gives_each_study_its_label_as_written(tmp_path) -> None:
    text = (
        "\ufeffStudy , LABEL,reader\n"  # a spreadsheet's byte order mark, header case and spaces, an extra column
        "1.2.840.10008.1,0,A\n"
        "\n"
        "/data/test/Ungood/img/brain_001.nii.gz, ABNORMAL ,B\n"
        "brain_002.nii.gz,Normal,C\n"
        "1.2.840.10008.1,normal,D\n"  # listed twice, with the same label
        '"2.25.7",1\n'
    )
    labels = read_study_labels(_labels_file(tmp_path, text))
    assert dict(labels) == {
        "1.2.840.10008.1": 0,
        "/data/test/Ungood/img/brain_001.nii.gz": 1,
        "brain_002.nii.gz": 0,
        "2.25.7": 1,
    }
    assert "labels.csv" in labels.source


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", r"labels\.csv' is empty: expected a header row with the columns study and label"),
        ("\n \n", r"labels\.csv' is empty"),
        ("study,label\n", r"labels\.csv' lists no study under its header \(line 1\)"),
        ("series,label\n1.2.3,1\n", r"labels\.csv', line 1: the header \['series', 'label'\] lacks .*\['study'\]"),
        ("study;label\n1.2.3;1\n", r"labels\.csv', line 1: .* lacks the column\(s\) \['study', 'label'\]"),
        ("study,label\n1.2.3,1\n4.5.6,2\n", r"labels\.csv', line 3: study '4\.5\.6' has the label '2'; expected 0, 1"),
        ("study,label\n1.2.3,yes\n", r"line 2: study '1\.2\.3' has the label 'yes'; expected 0, 1, normal or abnormal"),
        ("study,label\n1.2.3\n", r"line 2: study '1\.2\.3' has the label ''"),
        ("study,label\n,1\n", r"labels\.csv', line 2: the study column is empty"),
        (
            "study,label\n1.2.3,1\n4.5.6,0\n\n1.2.3,normal\n",
            r"labels\.csv', line 5: study '1\.2\.3' is listed again with the label 'normal', but line 2 gives it 1",
        ),
    ],
)
def test_the_reader_refuses_bad_files_naming_file_and_line(tmp_path, text, expected) -> None:
    with pytest.raises(MvfaInputError, match=expected):
        read_study_labels(_labels_file(tmp_path, text))


def test_the_reader_refuses_a_missing_or_binary_file(tmp_path) -> None:
    with pytest.raises(MvfaInputError, match=r"missing\.csv' does not exist"):
        read_study_labels(tmp_path / "missing.csv")
    (tmp_path / "scan.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(MvfaInputError, match=r"scan\.csv' cannot be read as a UTF-8 CSV file"):
        read_study_labels(tmp_path / "scan.csv")


# ---------------------------------------------------------------------------------------- matching


def test_studies_are_found_by_id_and_nifti_studies_by_file_name(tmp_path) -> None:
    text = (
        "study,label\n1.2.3,1\nbrain_001.nii.gz,1\n/data/test/good/img/brain_002.nii,0\nbrain_002.nii,1\n"
        "other_split.nii.gz,0\n"
    )
    labels = read_study_labels(_labels_file(tmp_path, text))
    studies = ["1.2.3", "/data/test/Ungood/img/brain_001.nii.gz", "/data/test/good/img/brain_002.nii", "1.2.3"]
    assert labels_of_studies(studies, labels) == {
        "1.2.3": 1,
        "/data/test/Ungood/img/brain_001.nii.gz": 1,  # by its file name
        "/data/test/good/img/brain_002.nii": 0,  # its id wins over its file name
    }
    # a DICOM study is found by its id only (a multi-frame file's id names the file too)
    with pytest.raises(MvfaInputError, match=r"no label for 1 of the 1 studies: '1\.2\.9/scan\.dcm'"):
        labels_of_studies(["1.2.9/scan.dcm"], StudyLabels({"scan.dcm": 1}, "labels"))
    # a file name that two studies of the split share names neither
    shared = ["/data/test/good/img/brain_001.nii.gz", "/data/test/Ungood/img/brain_001.nii.gz"]
    with pytest.raises(
        MvfaInputError,
        match=r"labels\.csv': a label given by a NIfTI file name that several studies share: 'brain_001\.nii\.gz' "
        r"\(/data/test/good/img/brain_001\.nii\.gz, /data/test/Ungood/img/brain_001\.nii\.gz\)",
    ):
        labels_of_studies(shared, labels)


def test_studies_missing_from_the_file_are_named(tmp_path) -> None:
    labels = read_study_labels(_labels_file(tmp_path, "study,label\nseries0,0\n"))
    studies = [f"series{index}" for index in range(8)]
    with pytest.raises(MvfaInputError) as error:
        study_results(studies, np.zeros(8), study_labels=labels)
    message = str(error.value)
    assert "labels.csv': no label for 7 of the 8 studies: " in message
    assert all(f"'series{index}'" in message for index in range(1, 6))
    assert "'series6'" not in message
    assert message.count("'series") == 5


# ---------------------------------------------------------------------------------- study results


def test_study_auroc_and_threshold_use_the_labels_of_the_file(tmp_path) -> None:
    studies, scores, slice_labels = _random_studies(3)
    names = list(dict.fromkeys(studies))
    rng = np.random.default_rng(5)
    given = {name: int(label) for name, label in zip(names, rng.integers(0, 2, len(names)), strict=True)}
    owner = np.array(studies)
    from_slices = {name: int(slice_labels[owner == name].max()) for name in names}
    assert sum(given[name] != from_slices[name] for name in names) >= 3  # the file says otherwise for some
    path = _write_labels(tmp_path / "labels.csv", {**given, "another_split": 1}, words=True)

    results = study_results(studies, scores, slice_labels, study_labels=read_study_labels(path))
    assert [result.label for result in results] == [given[name] for name in names]
    highest = [scores[owner == name].max() for name in names]
    truth = [given[name] for name in names]
    expected = roc_auc_score(truth, highest)
    assert expected != pytest.approx(roc_auc_score([from_slices[name] for name in names], highest))
    assert study_auroc(results) == pytest.approx(expected, abs=1e-6)
    threshold = fit_study_threshold(results)
    best = max(f1_score(truth, np.array(highest) > candidate) for candidate in [*highest, min(highest) - 1])
    assert f1_score(truth, np.array(highest) > threshold) == pytest.approx(best)


def _independent_studies(datamodule: MedicalAD, split: str) -> dict[str, tuple[float, int]]:
    """``{study: (highest mean intensity of its slices, highest slice label)}``, as ``_MeanScorer`` scores them."""
    data = getattr(datamodule, f"{split}_data")
    dataset = ResizedItems(data, 64)
    studies: dict[str, tuple[float, int]] = {}
    for index, study in enumerate(data.samples.study):
        item = dataset[index]
        best, label = studies.get(study, (-np.inf, 0))
        studies[study] = (max(best, float(item.image.mean())), max(label, int(item.gt_label)))
    return studies


def _f1_threshold(scores: list[float], labels: list[int]) -> float:
    ordered = np.sort(scores)
    return float(ordered[int(np.argmax([f1_score(labels, np.array(scores) > value) for value in ordered]))])


def test_evaluate_study_results_and_threshold_use_the_labels_of_the_file(tmp_path) -> None:
    datamodule = MedicalAD(root=_series_category(tmp_path / "data"), category="CT", num_workers=0)
    datamodule.setup()
    val, test = _independent_studies(datamodule, "val"), _independent_studies(datamodule, "test")
    # the file calls the first normal and the first abnormal volume of each split the other way
    flipped = {}
    for split in (val, test):
        for label in (0, 1):
            first = next(study for study, (_, truth) in split.items() if truth == label)
            flipped[first] = 1 - label
    given = {study: flipped.get(study, truth) for study, (_, truth) in {**val, **test}.items()}
    path = _write_labels(tmp_path / "labels.csv", given)
    args = SimpleNamespace(study_score="max", study_k=3, batch_size=4, study_labels=str(path))
    model = _MeanScorer()
    studies = split_study_results(args, model, datamodule, score_test_split(model, datamodule, 4))

    val_scores = [score for score, _ in val.values()]
    expected = _f1_threshold(val_scores, [given[study] for study in val])
    assert expected != pytest.approx(_f1_threshold(val_scores, [truth for _, truth in val.values()]), rel=1e-5)
    assert studies["threshold"] == pytest.approx(expected, rel=1e-5)
    for fusion in ("ours", "authors"):
        assert {result.study: result.label for result in studies[fusion]} == {study: given[study] for study in test}
    auroc = roc_auc_score([given[study] for study in test], [score for score, _ in test.values()])
    assert study_auroc(studies["ours"]) == pytest.approx(auroc, abs=1e-6)

    first_test = next(iter(test))
    _write_labels(path, {study: label for study, label in given.items() if study != first_test})
    with pytest.raises(MvfaInputError, match=rf"labels\.csv': no label for 1 of the 4 studies: '{first_test}'"):
        split_study_results(args, model, datamodule, score_test_split(model, datamodule, 4))


def test_evaluate_reports_the_study_auroc_of_the_labels_of_the_file(tmp_path) -> None:
    root = _series_category(tmp_path / "data")
    datamodule = MedicalAD(root=root, category="CT", num_workers=0)
    datamodule.setup()
    given = {}
    for split in ("val", "test"):  # the file calls one normal and one abnormal volume of each split the other way
        truth = getattr(datamodule, f"{split}_data").samples.groupby("study")["label_index"].max()
        flipped = {truth.idxmin(), truth.idxmax()}
        given.update({str(study): int(label) ^ (study in flipped) for study, label in truth.items()})
    path = _write_labels(tmp_path / "labels.csv", given)
    code = main([
        "evaluate", "--root", str(root), "--categories", "CT", "--k-shot", "1", "--epochs", "0", *TINY,
        "--feature-pipeline", "clip", "--output", str(tmp_path / "out"), "--study-labels", str(path),
    ])  # fmt: skip
    assert code == 0
    latest = tmp_path / "out" / "latest"
    images, studies, run = evaluate_rows(latest)
    highest = {}
    for row in images:
        highest[row["study"]] = max(highest.get(row["study"], -np.inf), float(row["score_ours"]))
    assert {row["study"]: int(row["label"]) for row in studies} == {study: given[study] for study in highest}
    auroc = roc_auc_score([given[study] for study in highest], list(highest.values()))
    slice_truth = {study: max(int(r["label"]) for r in images if r["study"] == study) for study in highest}
    assert auroc != pytest.approx(roc_auc_score(list(slice_truth.values()), list(highest.values())))
    assert float(run["ours_study_AUROC"]) == pytest.approx(100 * auroc, abs=1e-6)
    assert f"labelled by {path}" in (latest / "few-shot_1shot.md").read_text()


def test_evaluate_refuses_a_bad_labels_file_before_training(tmp_path) -> None:
    path = _labels_file(tmp_path, "study,grade\n1.2.3,1\n")
    with pytest.raises(MvfaInputError, match=r"labels\.csv', line 1: .* lacks the column\(s\) \['label'\]"):
        main(["evaluate", "--root", str(tmp_path), "--categories", "CT", *TINY, "--study-labels", str(path),
              "--output", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- benchmark


def test_benchmark_study_auroc_uses_the_labels_of_the_file(tmp_path) -> None:
    studies, scores, labels = _random_studies(4)
    names = [f"scan{i}.dcm" for i in range(len(studies))]
    samples = pd.DataFrame({"image_path": names, "study": studies, "slice": range(len(studies))})
    datamodule = SimpleNamespace(test_data=SimpleNamespace(samples=samples))
    rows = [{"file": n, "score": float(s), "label": int(y)} for n, s, y in zip(names, scores, labels, strict=True)]
    owner = np.array(studies)
    ids = list(dict.fromkeys(studies))
    given = {study: int(labels[owner == study].max()) ^ (index % 3 == 0) for index, study in enumerate(ids)}
    auroc, reason = study_auroc_of_rows(rows, datamodule, read_study_labels(_write_labels(tmp_path / "l.csv", given)))
    assert reason is None
    expected = roc_auc_score([given[study] for study in ids], [scores[owner == study].max() for study in ids])
    assert auroc == pytest.approx(expected, abs=1e-6)


def test_benchmark_reads_study_labels_from_its_config_and_refuses_a_bad_file(tmp_path) -> None:
    path = _labels_file(tmp_path, "study,label\n1.2.3,maybe\n")
    config = {
        "models": [{"class_path": "anomalib.models.Patchcore"}],
        "data": [{"class_path": "anomalib.data.MVTecAD"}],
        "study_labels": str(path),
        "output": str(tmp_path / "out"),
    }
    config_path = tmp_path / "benchmark.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert BenchmarkConfig.from_file(config_path).study_labels == str(path)
    with pytest.raises(MvfaInputError, match=r"labels\.csv', line 2: study '1\.2\.3' has the label 'maybe'"):
        main(["benchmark", "--config", str(config_path)])
    other = _labels_file(tmp_path, "", name="other.csv")
    with pytest.raises(MvfaInputError, match=r"other\.csv' is empty"):  # the command line wins
        main(["benchmark", "--config", str(config_path), "--study-labels", str(other)])
    assert not (tmp_path / "out").exists()
