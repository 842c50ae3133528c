"""Folders of scans as hospitals store them: DICOM series, NIfTI volumes, 16-bit images.

Each test writes its data (CT-like DICOM files with Hounsfield rescale, NIfTI volumes with a
non-canonical affine and label volumes), runs anomalib on it with the tiny backbone, and checks
the result against nibabel, pydicom or a computation written here.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import PredictDataset
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from anomalib_mvfa import Mvfa
from anomalib_mvfa.commands.benchmark import build_model
from anomalib_mvfa.data import MedicalAD, MedicalFolder, ScanFolder, ScanReader, VolumeMapWriter
from anomalib_mvfa.errors import MvfaInputError

from .conftest import TINY_IMAGE_SIZE, cpu_engine, folder_datamodule, write_dataset
from .test_lightning import TINY_CLI, run_anomalib

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}
SIZE = 48
# LPS-like orientation with swapped in-plane axes: far from nibabel's canonical RAS
AFFINE = np.array([[0.0, -0.9, 0.0, 30.0], [-1.1, 0.0, 0.0, 20.0], [0.0, 0.0, 2.5, -10.0], [0.0, 0.0, 0.0, 1.0]])


def _ct_slice(rng: np.random.Generator, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """Hounsfield units of a soft-tissue texture (and a bright lesion), with its mask."""
    x = np.linspace(0, 5 * np.pi, SIZE)
    hu = 40 + 30 * np.sin(x)[None, :] * np.cos(x)[:, None] + rng.normal(0, 6, (SIZE, SIZE))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if lesion:
        row, col = rng.integers(6, SIZE - 18, 2)
        mask[row : row + 12, col : col + 12] = 1
        hu[mask > 0] = 250
    return hu, mask


def write_dicom(path: Path, hu_frames: list[np.ndarray]) -> Path:
    """A CT image (12 bits stored, intercept -1024, a soft-tissue window), one frame per array."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "CT"
    dataset.Rows = dataset.Columns = SIZE
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.RescaleIntercept, dataset.RescaleSlope = -1024, 1
    dataset.WindowCenter, dataset.WindowWidth = 40, 400
    stored = np.stack([np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16) for hu in hu_frames])
    if len(hu_frames) > 1:
        dataset.NumberOfFrames = len(hu_frames)
    dataset.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_report(path: Path) -> Path:
    """A DICOM structured report: no pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "SR"
    dataset.save_as(path, enforce_file_format=True)
    return path


def write_dicom_folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(8):
        write_dicom(root / "normal" / f"IM{index:04d}.dcm", [_ct_slice(rng, False)[0]])
    write_dicom(root / "normal" / "series_3frames.dcm", [_ct_slice(rng, False)[0] for _ in range(3)])
    write_report(root / "normal" / "report.dcm")
    for index in range(4):
        hu, mask = _ct_slice(rng, True)
        write_dicom(root / "abnormal" / f"LES{index:04d}.dcm", [hu])
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask * 255).save(root / "masks" / f"LES{index:04d}.png")
    return root


def write_volume_pair(folder: Path, name: str, rng: np.random.Generator, lesion: bool, masks: Path | None) -> None:
    """A 48 x 48 x 6 volume (first and last slices empty: background only) and its label volume."""
    volume = np.full((SIZE, SIZE, 6), -1000.0, np.float32)
    labels = np.zeros((SIZE, SIZE, 6), np.uint8)
    for z in range(1, 5):
        hu, mask = _ct_slice(rng, lesion and z in {2, 3})
        volume[..., z], labels[..., z] = hu, mask
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, AFFINE), folder / f"{name}.nii.gz")
    if masks is not None:
        masks.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels, AFFINE), masks / f"{name}_mask.nii.gz")


def write_nifti_folder(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for index in range(3):
        write_volume_pair(root / "normal", f"normal{index}", rng, False, None)
    for index in range(2):
        write_volume_pair(root / "abnormal", f"case{index}", rng, True, root / "masks")
    return root


def folder_args(root: Path) -> list[str]:
    return [
        "--data", "anomalib_mvfa.data.MedicalFolder", "--data.root", str(root), "--data.normal_dir", "normal",
        "--data.abnormal_dir", "abnormal", "--data.mask_dir", "masks", "--data.num_workers", "0",
        "--data.train_batch_size", "4", "--data.eval_batch_size", "4", "--data.seed", "0",
    ]  # fmt: skip


def test_a_dicom_folder_trains_and_tests_from_the_cli(tmp_path) -> None:
    root = write_dicom_folder(tmp_path / "scans")
    output = run_anomalib(
        "train", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1",
        *folder_args(root), "--default_root_dir", tmp_path / "run",
    )  # fmt: skip
    assert "Mvfa epoch 1/1: loss" in output
    assert re.search(r"pixel_AUROC\s*│\s*\d\.\d+", output)
    assert re.search(r"report\.dcm' holds no pixel data.*skipped", output)
    # the three frames of the multi-frame file are three samples, visualised apart, DICOM named
    pictures = {path.name for path in (tmp_path / "run").rglob("*.png")}
    assert any(name.endswith(".dcm.png") for name in pictures)


def test_a_dicom_folder_is_read_through_the_file_window(tmp_path) -> None:
    root = write_dicom_folder(tmp_path / "scans")
    datamodule = MedicalFolder(root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", seed=0)
    datamodule.setup()
    every = {
        name
        for split in ("train_data", "val_data", "test_data")
        for name in getattr(datamodule, split).samples.image_path
    }
    assert {f"{root / 'normal' / 'series_3frames.dcm'}#frame={i:03d}" for i in range(3)} <= every
    assert not any("report" in name for name in every)
    name = str(root / "abnormal" / "LES0000.dcm")
    dataset = pydicom.dcmread(name)
    hu = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset)
    # the file's window (centre 40, width 400), as PS3.3 C.11.2.1.2.1 states it
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    image = datamodule.reader.read_image(name)
    assert torch.allclose(image[0].double(), torch.from_numpy(expected), atol=1e-6)
    # a user window in Hounsfield units instead
    brain = ScanReader(intensity="window", window=(40, 80)).read_image(name)
    assert torch.allclose(brain[1].double(), torch.from_numpy(np.clip((hu - 0) / 80, 0, 1)), atol=1e-6)


def test_a_volume_stays_in_one_split(tmp_path) -> None:
    root = tmp_path / "volumes"
    rng = np.random.default_rng(1)
    for index in range(10):
        write_volume_pair(root / "normal", f"normal{index}", rng, False, None)
    for index in range(2):
        write_volume_pair(root / "abnormal", f"case{index}", rng, True, root / "masks")
    datamodule = MedicalFolder(root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", seed=3)
    datamodule.setup()
    splits = {name: getattr(datamodule, f"{name}_data").samples for name in ("train", "val", "test")}
    files = {name: set(samples.source_file) for name, samples in splits.items()}
    assert not files["train"] & files["test"]
    assert not files["train"] & files["val"]
    assert not files["val"] & files["test"]
    # normal volumes moved to test and val whole: every one of their 6 slices, once
    names = [name for samples in splits.values() for name in samples.image_path]
    assert len(names) == len(set(names)) == 12 * 6
    normal_in_test = {file for file in files["test"] | files["val"] if "normal" in Path(file).name}
    assert normal_in_test
    # slices of an abnormal volume are labelled by their label-volume slice
    case = splits["test"] if any("case0" in f for f in files["test"]) else splits["val"]
    case = case[case.source_file.str.contains("case0")]
    labels = nib.load(root / "masks" / "case0_mask.nii.gz")
    canonical = nib.as_closest_canonical(labels).get_fdata()
    expected = {z: int(canonical[:, :, z].any()) for z in range(canonical.shape[2])}
    assert {
        int(name.rsplit("=", 1)[1]): label for name, label in zip(case.image_path, case.label_index, strict=True)
    } == expected


def test_a_nifti_folder_trains_and_its_predictions_are_volumes_over_the_scans(tmp_path) -> None:
    root = write_nifti_folder(tmp_path / "volumes")
    output = run_anomalib(
        "train", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1", *folder_args(root),
        "--data.reader.skip_empty_slices", "true", "--default_root_dir", tmp_path / "run",
    )  # fmt: skip
    assert re.search(r"pixel_AUROC\s*│\s*\d\.\d+", output)
    (checkpoint,) = (tmp_path / "run").rglob("model.ckpt")

    maps = tmp_path / "maps"
    run_anomalib(
        "predict", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--ckpt_path", checkpoint,
        "--data", "anomalib_mvfa.data.ScanFolder", "--data.path", root / "abnormal", "--data.num_workers", "0",
        "--trainer.callbacks+=anomalib_mvfa.data.VolumeMapWriter", "--trainer.callbacks.output_dir", maps,
        "--default_root_dir", tmp_path / "predict",
    )  # fmt: skip
    for case in ("case0", "case1"):
        source = nib.load(root / "abnormal" / f"{case}.nii.gz")
        for kind in ("anomaly_map", "pred_mask"):
            written = nib.load(maps / f"{case}_{kind}.nii.gz")
            assert written.shape == source.shape
            assert np.allclose(written.affine, source.affine, atol=1e-6)
    assert not [path for path in maps.iterdir() if "partial" in path.name]
    pictures = sorted(path.name for path in (tmp_path / "predict").rglob("*.png"))
    assert pictures == sorted(f"{case}.nii.gz_axial{z:03d}.png" for case in ("case0", "case1") for z in range(6))

    # the maps sit where their slices are: compare with predictions made here, put back with nibabel
    model = Mvfa.load_from_checkpoint(checkpoint, weights_only=True)
    writer = VolumeMapWriter(tmp_path / "maps-python")
    predictions = cpu_engine(tmp_path / "predict-python", [writer]).predict(
        model, datamodule=ScanFolder(root / "abnormal", num_workers=0, eval_batch_size=4), return_predictions=True
    )
    written = nib.as_closest_canonical(nib.load(tmp_path / "maps-python" / "case1_anomaly_map.nii.gz")).get_fdata()
    checked = 0
    for batch in predictions:
        for name, anomaly_map in zip(batch.image_path, batch.anomaly_map, strict=True):
            if "case1" not in name:
                continue
            z = int(name.rsplit("=", 1)[1])
            resized = F.interpolate(
                anomaly_map.reshape(1, 1, *anomaly_map.shape[-2:]), size=(SIZE, SIZE), mode="bilinear"
            )
            shown = written[:, :, z].T[::-1]  # the slice as the reader shows it
            assert np.allclose(shown, resized[0, 0].numpy(), atol=1e-5)
            checked += 1
    assert checked == 6


def _png_with_sbit(path: Path, values: np.ndarray, bits: int) -> Path:
    """A 16-bit grey PNG whose sBIT chunk states ``bits`` significant bits."""
    Image.fromarray(values).save(path)
    data = path.read_bytes()
    chunk = b"sBIT" + bytes([bits])
    sbit = len(chunk[4:]).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")
    end_of_header = 8 + 4 + 4 + 13 + 4
    path.write_bytes(data[:end_of_header] + sbit + data[end_of_header:])
    return path


def test_prediction_on_a_folder_of_16_bit_pngs_scores_them_as_their_8_bit_copies(tmp_path) -> None:
    data_root = write_dataset(tmp_path / "data", "folder")
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    cpu_engine(tmp_path / "run").fit(model, datamodule=folder_datamodule(data_root))
    eight, sixteen = tmp_path / "eight", tmp_path / "sixteen"
    eight.mkdir()
    sixteen.mkdir()
    for path in sorted((data_root / "test" / "broken").glob("*.png")):
        grey = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(grey).save(eight / path.name)
        _png_with_sbit(sixteen / path.name, grey.astype(np.uint16) * 257, 16)  # the same values, 16 bits
    engine = cpu_engine(tmp_path / "predict")
    scores = {}
    for name, folder in (("eight", eight), ("sixteen", sixteen)):
        predictions = engine.predict(model, data_path=folder)
        scores[name] = torch.cat([batch.pred_score for batch in predictions])
        images = torch.cat([batch.image for batch in predictions])
        assert images.mean() < 0.9, f"{name}: images read saturated"
    assert torch.allclose(scores["eight"], scores["sixteen"], atol=1e-3)
    assert scores["eight"].std() > 0


def test_prediction_on_a_folder_of_dicom_files_anomalib_finds_no_image_in_reads_every_frame(tmp_path) -> None:
    """``Engine.predict(data_path=...)``, as ``anomalib predict --data <folder>`` calls it, on DICOM files only."""
    folder = tmp_path / "dicom"
    rng = np.random.default_rng(0)
    write_dicom(folder / "one.dcm", [_ct_slice(rng, lesion=False)[0]])
    write_dicom(folder / "series" / "IM0002", [_ct_slice(rng, lesion=True)[0] for _ in range(2)])  # two frames
    (folder / "notes.txt").write_text("not a scan")
    with pytest.raises(ValueError, match="Found 0 images"):  # anomalib's own listing
        PredictDataset(folder)
    predictions = cpu_engine(tmp_path / "predict").predict(Mvfa(**TINY, k_shot=0), data_path=folder)
    scored = [name for batch in predictions for name in batch.image_path]
    expected = ScanReader().samples(folder / "one.dcm") + ScanReader().samples(folder / "series" / "IM0002")
    assert sorted(scored) == sorted(str(name) for name in expected)
    assert len(scored) == 3
    assert torch.cat([batch.pred_score for batch in predictions]).isfinite().all()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a scan")
    with pytest.raises(MvfaInputError, match="holds no readable file") as raised:
        cpu_engine(tmp_path / "predict").predict(Mvfa(**TINY, k_shot=0), data_path=tmp_path / "empty")
    assert str(tmp_path / "empty") in str(raised.value)


def test_prediction_on_a_folder_whose_scans_anomalib_leaves_out_stops_naming_scan_folder(tmp_path) -> None:
    """anomalib lists ``--data <folder>`` with image suffixes only: DICOM and NIfTI beside the images are refused."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / f"{index}.png")
    write_dicom(folder / "series" / "IM0001", [_ct_slice(rng, lesion=False)[0]])  # no suffix, in a sub-folder
    model = Mvfa(**TINY, k_shot=0)
    with pytest.raises(MvfaInputError, match="left out 1 DICOM or NIfTI") as raised:
        cpu_engine(tmp_path / "predict").predict(model, data_path=folder)
    assert "IM0001" in str(raised.value)
    assert f"--data anomalib_mvfa.data.ScanFolder --data.root {folder}" in str(raised.value)


def test_bad_folders_are_refused_naming_the_file(tmp_path) -> None:
    root = write_dicom_folder(tmp_path / "scans")
    (root / "masks" / "LES0002.png").unlink()
    with pytest.raises(ValueError, match=r"Abnormal file '.*LES0002\.dcm' has no mask"):
        MedicalFolder(root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks").setup()
    volumes = write_nifti_folder(tmp_path / "volumes")
    label = nib.load(volumes / "masks" / "case0_mask.nii.gz")
    shifted = label.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), volumes / "masks" / "case0_mask.nii.gz")
    with pytest.raises(ValueError, match=r"case0_mask\.nii\.gz' has another affine than its image volume '.*case0"):
        MedicalFolder(root=volumes, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks").setup()
    with pytest.raises(ValueError, match=r"report\.dcm' holds no pixel data"):
        MedicalFolder(root=root, normal_dir="normal", reader=ScanReader(non_image_files="error")).setup()


def test_the_benchmark_layout_takes_dicom_and_nifti(tmp_path) -> None:
    rng = np.random.default_rng(2)
    base = tmp_path / "MVFA" / "Scans_AD"
    for split in ("valid", "test"):
        for index in range(3):
            write_dicom(base / split / "good" / "img" / f"n{index}.dcm", [_ct_slice(rng, False)[0]])
        hu, mask = _ct_slice(rng, True)
        write_dicom(base / split / "Ungood" / "img" / "lesion.dcm", [hu])
        (base / split / "Ungood" / "anomaly_mask").mkdir(parents=True)
        Image.fromarray(mask * 255).save(base / split / "Ungood" / "anomaly_mask" / "lesion.png")
        write_volume_pair(
            base / split / "Ungood" / "img", "volume", rng, True, base / split / "Ungood" / "anomaly_mask"
        )
    datamodule = MedicalAD(root=tmp_path / "MVFA", category="Scans", num_workers=0)
    datamodule.setup()
    samples = datamodule.test_data.samples
    assert len(samples) == 3 + 1 + 6  # three DICOM files, one more, six slices
    volume = samples[samples.source_file.str.endswith("volume.nii.gz")]
    assert set(volume.mask_path.str.rsplit("#", n=1).str[0]) == {
        str(base / "test" / "Ungood" / "anomaly_mask" / "volume_mask.nii.gz")
    }
    position = int(samples.index[samples.image_path.str.endswith("lesion.dcm")][0])
    item = datamodule.test_data[position]
    dataset = pydicom.dcmread(base / "test" / "Ungood" / "img" / "lesion.dcm")
    hu = pydicom.pixels.apply_modality_lut(dataset.pixel_array, dataset)
    expected = np.clip((hu - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)  # the file's window
    assert torch.allclose(item.image[0].double(), torch.from_numpy(expected), atol=1e-6)
    assert int(item.gt_mask.sum()) == 144  # the 12 x 12 lesion


def test_patchcore_runs_beside_mvfa_on_a_dicom_folder_in_the_benchmark(tmp_path) -> None:
    root = write_dicom_folder(tmp_path / "scans")
    entry = {"class_path": "anomalib.models.Patchcore", "init_args": {"backbone": "resnet18", "layers": ["layer2"]}}
    model = build_model(entry, random_weights=True, seed=0)
    datamodule = MedicalFolder(
        root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", num_workers=0, seed=0,
        train_batch_size=4, eval_batch_size=4,
    )  # fmt: skip
    results = cpu_engine(tmp_path / "run").train(model, datamodule=datamodule)
    assert 0.0 <= results[0]["pixel_AUROC"] <= 1.0
    pictures = {path.name for path in (tmp_path / "run").rglob("*.png")}
    assert {"LES0000.dcm.png", "IM0000.dcm.png"} & pictures  # anomalib's visualizer cannot open DICOM


def test_masks_inside_the_abnormal_folder_are_not_read_as_images(tmp_path) -> None:
    root = write_dicom_folder(tmp_path / "scans")
    (root / "masks").rename(root / "abnormal" / "masks")
    datamodule = MedicalFolder(root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="abnormal/masks")
    datamodule.setup()
    every = [
        name for split in ("train", "val", "test") for name in getattr(datamodule, f"{split}_data").samples.image_path
    ]
    assert not [name for name in every if Path(name).parent.name == "masks"]
    abnormal = datamodule.test_data.samples
    abnormal = abnormal[abnormal.label_index == 1]
    assert len(abnormal) + len(datamodule.val_data.samples.query("label_index == 1")) == 4
    assert all(Path(mask).parent.name == "masks" for mask in abnormal.mask_path)
