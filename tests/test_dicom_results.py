"""Results of DICOM series written back as DICOM Segmentations and Parametric Maps, read back with highdicom."""

from __future__ import annotations

import csv
import logging
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from anomalib_mvfa import Mvfa
from anomalib_mvfa.data import MedicalFolder, ScanPredictDataset, VolumeMapWriter

from .conftest import cpu_engine
from .dicom_series import write_ct_series, write_png_masks


def _trainer(tmp_path) -> SimpleNamespace:
    return SimpleNamespace(datamodule=None, is_global_zero=True, world_size=1, default_root_dir=str(tmp_path))


def _predict(writer: VolumeMapWriter, trainer, names: list[str], maps: np.ndarray, masks: np.ndarray) -> None:
    """Two batches of predictions through the writer's hooks, as anomalib's predict loop calls them."""
    for batch in (slice(0, 3), slice(3, None)):
        outputs = SimpleNamespace(
            image_path=names[batch],
            anomaly_map=torch.from_numpy(maps[batch])[:, None],
            pred_mask=torch.from_numpy(masks[batch])[:, None].bool(),
        )
        writer.on_predict_batch_end(trainer, None, outputs, None, 0)
    writer.on_predict_epoch_end(trainer, None)


def _frame_sources(dataset: pydicom.Dataset) -> list[str]:
    """The source SOP Instance UID each frame was derived from."""
    return [
        frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for frame in dataset.PerFrameFunctionalGroupsSequence
    ]


def test_a_series_is_written_as_a_segmentation_and_a_parametric_map(tmp_path) -> None:
    rng = np.random.default_rng(0)
    series = write_ct_series(tmp_path / "ct", rng, slices=5, lesions=(1, 2))
    count, rows, columns = 5, *series.masks[0].shape
    maps = rng.random((count, rows, columns)).astype(np.float32) * 3 - 1  # at the source's size: not resampled
    masks = (maps > 1.2).astype(np.uint8)
    order = rng.permutation(count)  # scored in another order than the anatomical one
    names = [str(series.files[index]) for index in order]
    writer = VolumeMapWriter(tmp_path / "out")
    _predict(writer, _trainer(tmp_path), names, maps[order], masks[order])
    assert sorted(path.name for path in writer.written) == [f"{series.uid}_anomaly_map.dcm", f"{series.uid}_seg.dcm"]
    assert not writer.not_written
    assert not [path for path in (tmp_path / "out").iterdir() if path.name.startswith(".")]  # no temporary left
    by_uid = {dataset.SOPInstanceUID: index for index, dataset in enumerate(series.datasets)}
    source = series.datasets[0]

    seg = hd.seg.segread(tmp_path / "out" / f"{series.uid}_seg.dcm")
    pm = pydicom.dcmread(tmp_path / "out" / f"{series.uid}_anomaly_map.dcm")
    for written in (seg, pm):
        assert int(written.NumberOfFrames) == count
        assert written.FrameOfReferenceUID == series.frame_of_reference
        assert written.StudyInstanceUID == source.StudyInstanceUID
        assert written.PatientID == source.PatientID
        (referenced,) = written.ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID == series.uid
        assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(by_uid)
        shared = written.SharedFunctionalGroupsSequence[0]
        orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        assert np.allclose([float(v) for v in orientation], [float(v) for v in source.ImageOrientationPatient])
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        assert np.allclose([float(v) for v in spacing], [float(v) for v in source.PixelSpacing])
        frames = _frame_sources(written)
        assert sorted(frames) == sorted(by_uid)  # one frame per slice
        for frame, uid in zip(written.PerFrameFunctionalGroupsSequence, frames, strict=True):
            position = frame.PlanePositionSequence[0].ImagePositionPatient
            expected = series.datasets[by_uid[uid]].ImagePositionPatient
            assert np.allclose([float(v) for v in position], [float(v) for v in expected], atol=1e-4)

    # the predicted masks, slice by slice as the source instances are
    uids = [dataset.SOPInstanceUID for dataset in series.datasets]
    read = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    assert np.array_equal(read, masks)
    # the anomaly maps, within float32 rounding
    values = pm.pixel_array
    for frame, uid in enumerate(_frame_sources(pm)):
        assert np.allclose(values[frame], maps[by_uid[uid]], rtol=0, atol=1e-6)


def test_files_that_cannot_be_written_are_named_with_the_reason(tmp_path, caplog) -> None:
    series = write_ct_series(tmp_path / "ct", np.random.default_rng(1), slices=3)
    lone = pydicom.dcmread(series.files[0])
    del lone.SeriesInstanceUID
    lone.SOPInstanceUID = lone.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    lone.save_as(tmp_path / "lone.dcm")
    flat = pydicom.dcmread(series.files[1])  # a radiograph of its own series: no plane
    del flat.ImagePositionPatient, flat.ImageOrientationPatient
    flat.SeriesInstanceUID = pydicom.uid.generate_uid()
    flat.SOPInstanceUID = flat.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    flat.save_as(tmp_path / "flat.dcm")
    names = [*map(str, series.files), str(tmp_path / "lone.dcm"), str(tmp_path / "flat.dcm")]
    maps = np.zeros((5, *series.masks[0].shape), np.float32)
    writer = VolumeMapWriter(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        _predict(writer, _trainer(tmp_path), names, maps, maps.astype(np.uint8))
    assert sorted(writer.not_written) == [str(tmp_path / "flat.dcm"), str(tmp_path / "lone.dcm")]
    assert "SeriesInstanceUID" in writer.not_written[str(tmp_path / "lone.dcm")]
    assert "ImagePositionPatient" in writer.not_written[str(tmp_path / "flat.dcm")]
    assert any("lone.dcm" in record.getMessage() for record in caplog.records)
    assert len(writer.written) == 2  # the series is written all the same


@pytest.mark.parametrize("masks", [True, False])
def test_the_writer_writes_the_map_alone_without_masks(tmp_path, masks) -> None:
    series = write_ct_series(tmp_path / "ct", np.random.default_rng(2), slices=4)
    maps = np.random.default_rng(3).random((4, *series.masks[0].shape)).astype(np.float32)
    writer = VolumeMapWriter(tmp_path / "out", masks=masks)
    _predict(writer, _trainer(tmp_path), [str(path) for path in series.files], maps, (maps > 0.5).astype(np.uint8))
    kinds = sorted(path.name.removeprefix(series.uid + "_") for path in writer.written)
    assert kinds == (["anomaly_map.dcm", "seg.dcm"] if masks else ["anomaly_map.dcm"])


def _ground_truth_segmentation(series, path) -> None:
    """A DICOM Segmentation of the series' masks made here with highdicom, as an annotation tool would."""
    sources = [pydicom.dcmread(file) for file in series.files]
    abnormal = hd.sr.CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
    segment = hd.seg.SegmentDescription(1, "lesion", abnormal, abnormal, hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    segmentation = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.stack(series.masks).astype(bool), segmentation_type="BINARY",
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1",
        device_serial_number="1",
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(path)


def test_a_dicom_segmentation_in_the_mask_folder_gives_the_masks_of_its_png_copies(tmp_path) -> None:
    rng = np.random.default_rng(4)
    normal = write_ct_series(tmp_path / "normal", rng, slices=3)
    abnormal = write_ct_series(tmp_path / "abnormal", rng, slices=4, lesions=(1, 2))
    write_png_masks(abnormal, tmp_path / "png_masks")
    _ground_truth_segmentation(abnormal, tmp_path / "seg_masks" / "annotation.dcm")  # a name of no image
    read = {}
    for masks in ("png_masks", "seg_masks"):
        datamodule = MedicalFolder(
            root=tmp_path, normal_dir="normal", abnormal_dir="abnormal", mask_dir=masks, seed=0, num_workers=0,
            normal_split_ratio=0.0, val_split_mode="none",
        )  # fmt: skip
        datamodule.setup()
        test_data = datamodule.test_data
        read[masks] = {item.image_path: item for item in (test_data[i] for i in range(len(test_data)))}
    assert sorted(read["seg_masks"]) == sorted(map(str, abnormal.files))
    assert normal.files  # the normal series trains
    for name, item in read["seg_masks"].items():
        assert torch.equal(item.gt_mask, read["png_masks"][name].gt_mask)
        assert "#sop=" in item.mask_path
        assert int(item.gt_label) == int(item.gt_mask.any())  # a slice without a marked pixel is normal
    assert [int(read["seg_masks"][str(path)].gt_label) for path in abnormal.files] == [0, 1, 1, 0]


def test_a_prediction_on_a_series_folder_writes_dicom_results_and_study_rows(tiny_config, tmp_path) -> None:
    rng = np.random.default_rng(6)
    first = write_ct_series(tmp_path / "scans" / "a", rng, slices=3, lesions=(1,))
    second = write_ct_series(tmp_path / "scans" / "b", rng, slices=4)
    model = Mvfa(
        backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=0, k_shot=0,
        class_name="CT",
    )  # fmt: skip
    writer = VolumeMapWriter(tmp_path / "dicom")
    cpu_engine(tmp_path / "run", [writer]).predict(model, dataset=ScanPredictDataset(tmp_path / "scans"))
    assert not writer.not_written
    assert sorted(path.name for path in writer.written) == sorted(
        f"{series.uid}_{kind}.dcm" for series in (first, second) for kind in ("seg", "anomaly_map")
    )
    (table,) = (tmp_path / "run").rglob("predictions.csv")
    with table.open() as file:
        rows = {row["file"]: row for row in csv.DictReader(file)}
    for series in (first, second):
        for index, path in enumerate(series.files):
            assert (rows[str(path)]["study"], int(rows[str(path)]["slice"])) == (series.uid, index)
        written = pydicom.dcmread(tmp_path / "dicom" / f"{series.uid}_anomaly_map.dcm")
        assert written.pixel_array.shape == (len(series.files), *series.masks[0].shape)


def test_an_enhanced_multi_frame_image_gets_results_frame_by_frame(tmp_path) -> None:
    series = write_ct_series(tmp_path / "single", np.random.default_rng(7), slices=3)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(path) for path in series.files], series_instance_uid=series.uid, series_number=1,
        sop_instance_uid=hd.UID(), instance_number=1,
    )  # fmt: skip
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    dataset = ScanPredictDataset(tmp_path / "multi")
    assert sorted(dataset.identities.values()) == [(series.uid, index) for index in range(3)]
    names = list(dataset.identities)
    maps = np.random.default_rng(8).random((3, *series.masks[0].shape)).astype(np.float32)
    writer = VolumeMapWriter(tmp_path / "out")
    _predict(writer, _trainer(tmp_path), names, maps, (maps > 0.7).astype(np.uint8))
    assert not writer.not_written
    source = pydicom.dcmread(tmp_path / "multi" / "enhanced.dcm")
    source_positions = [
        [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        for frame in source.PerFrameFunctionalGroupsSequence
    ]
    for path in writer.written:
        written = pydicom.dcmread(path)
        for frame in written.PerFrameFunctionalGroupsSequence:
            reference = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
            position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
            assert np.allclose(position, source_positions[int(reference.ReferencedFrameNumber) - 1], atol=1e-4)
    pm = pydicom.dcmread(tmp_path / "out" / f"{series.uid}_anomaly_map.dcm")
    for frame, values in zip(pm.PerFrameFunctionalGroupsSequence, pm.pixel_array, strict=True):
        number = int(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        assert np.allclose(values, maps[number - 1], rtol=0, atol=1e-6)


def test_a_multi_frame_image_without_frame_positions_is_named(tmp_path) -> None:
    series = write_ct_series(tmp_path / "single", np.random.default_rng(9), slices=3)
    dataset = pydicom.dcmread(series.files[0])
    dataset.NumberOfFrames = 3
    dataset.PixelData = np.stack([pydicom.dcmread(path).pixel_array for path in series.files]).tobytes()
    (tmp_path / "multi").mkdir()
    dataset.save_as(tmp_path / "multi" / "legacy.dcm")
    names = [f"{tmp_path / 'multi' / 'legacy.dcm'}#frame={index:03d}" for index in range(3)]
    maps = np.zeros((3, *series.masks[0].shape), np.float32)
    writer = VolumeMapWriter(tmp_path / "out")
    _predict(writer, _trainer(tmp_path), names, maps, maps.astype(np.uint8))
    assert not writer.written
    (reason,) = writer.not_written.values()
    assert "legacy.dcm" in reason
    assert "PerFrameFunctionalGroupsSequence" in reason
