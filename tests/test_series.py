"""DICOM series as volumes: grouped by SeriesInstanceUID, ordered along the slice normal, kept in one split."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest

from anomalib_mvfa.data import MedicalAD, MedicalFolder, ScanPredictDataset, ScanReader
from anomalib_mvfa.errors import MvfaInputError

from .dicom_series import write_ct_series, write_png_masks
from .test_scan_folders import write_volume_pair


def _anatomical(samples, uid: str) -> list[str]:
    series = samples[samples.study == uid]
    return series.sort_values("slice").image_path.tolist()


def test_a_shuffled_oblique_series_is_assembled_in_anatomical_order(tmp_path) -> None:
    rng = np.random.default_rng(0)
    normal = [write_ct_series(tmp_path / "normal" / f"s{i}", rng) for i in range(2)]
    abnormal = write_ct_series(tmp_path / "abnormal", rng, lesions=(2, 3))
    write_png_masks(abnormal, tmp_path / "masks")
    datamodule = MedicalFolder(root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", seed=0)
    datamodule.setup()
    samples = {name: getattr(datamodule, f"{name}_data").samples for name in ("train", "test")}
    every = [name for table in samples.values() for name in table.image_path]
    assert len(every) == len(set(every)) == 18  # each slice is one sample
    for series in [*normal, abnormal]:
        table = next(table for table in samples.values() if series.uid in set(table.study))
        # the order the files were written along the normal, not their names or instance numbers
        assert _anatomical(table, series.uid) == [str(path) for path in series.files]
        assert sorted(table[table.study == series.uid]["slice"]) == list(range(6))
    # a prediction folder gives the same identities
    predicted = ScanPredictDataset(tmp_path / "normal")
    for series in normal:
        for index, path in enumerate(series.files):
            assert predicted.identities[str(path)] == (series.uid, index)


def test_positions_missing_or_uneven_fall_back_to_instance_numbers_with_a_warning(tmp_path, caplog) -> None:
    rng = np.random.default_rng(1)
    series = write_ct_series(tmp_path / "normal", rng, slices=7, instance_numbers=list(range(1, 8)))
    series.files[3].unlink()  # a missing file: uneven gaps
    kept = series.files[:3] + series.files[4:]
    with caplog.at_level(logging.WARNING):
        predicted = ScanPredictDataset(tmp_path / "normal")
    assert any(series.uid in record.getMessage() and "unevenly" in record.getMessage() for record in caplog.records)
    assert [predicted.identities[str(path)].slice for path in kept] == list(range(6))

    # no positions at all: instance numbers order the slices, and the warning names the series
    other = write_ct_series(tmp_path / "bare", rng, slices=4, instance_numbers=[4, 3, 2, 1])
    for path in other.files:
        dataset = pydicom.dcmread(path)
        del dataset.ImagePositionPatient
        dataset.save_as(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        predicted = ScanPredictDataset(tmp_path / "bare")
    assert any(other.uid in r.getMessage() and "InstanceNumber" in r.getMessage() for r in caplog.records)
    assert [predicted.identities[str(path)].slice for path in other.files] == [3, 2, 1, 0]


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PixelSpacing", [0.9, 0.9]), ("ImageOrientationPatient", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0])],
)
def test_a_series_whose_files_disagree_is_refused_naming_it_and_the_files(tmp_path, keyword, value) -> None:
    series = write_ct_series(tmp_path / "normal", np.random.default_rng(2), slices=4)
    odd = series.files[2]
    dataset = pydicom.dcmread(odd)
    setattr(dataset, keyword, value)
    dataset.save_as(odd)
    with pytest.raises(MvfaInputError, match=series.uid) as error:
        MedicalFolder(normal_dir=tmp_path / "normal").setup()
    assert str(odd) in str(error.value)
    assert keyword in str(error.value)
    # read as images of their own, the files are accepted
    alone = ScanPredictDataset(tmp_path / "normal", reader=ScanReader(group_series=False))
    assert {identity.study for identity in alone.identities.values()} == {str(path) for path in series.files}


def test_random_splits_keep_every_series_whole(tmp_path) -> None:
    rng = np.random.default_rng(3)
    normal = [write_ct_series(tmp_path / "normal" / f"s{i}", rng, slices=3) for i in range(8)]
    abnormal = [write_ct_series(tmp_path / "abnormal" / f"a{i}", rng, slices=3, lesions=(1,)) for i in range(2)]
    datamodule = MedicalFolder(root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", seed=5)
    datamodule.setup()
    splits = ("train", "val", "test")
    studies = {name: getattr(datamodule, f"{name}_data").samples.groupby("study").size() for name in splits}
    seen = [uid for sizes in studies.values() for uid in sizes.index]
    assert sorted(seen) == sorted(series.uid for series in [*normal, *abnormal])  # each in exactly one split
    assert all((sizes == 3).all() for sizes in studies.values())  # and whole
    assert set(studies["test"].index) | set(studies["val"].index) > {series.uid for series in abnormal}


def test_the_benchmark_layout_groups_series_too(tmp_path) -> None:
    rng = np.random.default_rng(4)
    base = tmp_path / "CT_AD"
    for split in ("valid", "test"):
        good = write_ct_series(base / split / "good" / "img", rng, slices=3)
        bad = write_ct_series(base / split / "Ungood" / "img", rng, slices=3, lesions=(0, 1))
    datamodule = MedicalAD(root=tmp_path, category="CT")
    datamodule.setup()
    samples = datamodule.test_data.samples
    assert _anatomical(samples, good.uid) == [str(path) for path in good.files]
    assert _anatomical(samples, bad.uid) == [str(path) for path in bad.files]


def test_a_multi_frame_file_takes_its_series_uid_as_study(tmp_path) -> None:
    series = write_ct_series(tmp_path / "one", np.random.default_rng(5), slices=3)
    frames = np.stack([pydicom.dcmread(path).pixel_array for path in series.files])
    dataset = pydicom.dcmread(series.files[0])
    dataset.NumberOfFrames = 3
    dataset.PixelData = frames.tobytes()
    (tmp_path / "multi").mkdir()
    dataset.save_as(tmp_path / "multi" / "enhanced.dcm")
    predicted = ScanPredictDataset(tmp_path / "multi")
    assert sorted(predicted.identities.values()) == [(series.uid, index) for index in range(3)]


def test_a_nifti_volume_is_a_study_of_its_slices(tmp_path) -> None:
    rng = np.random.default_rng(6)
    for index in range(2):
        write_volume_pair(tmp_path / "normal", f"normal{index}", rng, False, None)
    write_volume_pair(tmp_path / "abnormal", "case0", rng, True, tmp_path / "masks")
    datamodule = MedicalFolder(root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", seed=0)
    datamodule.setup()
    for split in ("train_data", "test_data"):
        samples = getattr(datamodule, split).samples
        assert (samples.study == samples.source_file).all()
        assert [int(name.rsplit("=", 1)[1]) for name in samples.image_path] == list(samples["slice"])


def test_projection_images_sharing_a_series_stay_images_of_their_own(tmp_path, caplog) -> None:
    series = write_ct_series(tmp_path / "xray", np.random.default_rng(8), slices=3)
    for path in series.files:  # radiographs state neither a position nor an orientation
        dataset = pydicom.dcmread(path)
        del dataset.ImagePositionPatient, dataset.ImageOrientationPatient
        dataset.save_as(path)
    with caplog.at_level(logging.WARNING):
        predicted = ScanPredictDataset(tmp_path / "xray")
    assert {identity.study for identity in predicted.identities.values()} == {str(path) for path in series.files}
    assert not [record for record in caplog.records if series.uid in record.getMessage()]
