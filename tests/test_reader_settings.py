"""One reader setting for every datamodule: ``reader:`` of MedicalFolder, ScanFolder and MedicalAD.

Each test builds the three datamodules on the same small data (a 4D NIfTI volume and a DICOM
report without pixels) and checks that every reader setting reaches what the datamodule reads:
from Python, from anomalib's command line (``--data.reader.*``) and from a config file.
"""

from __future__ import annotations

import inspect
import shutil
from dataclasses import fields
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from anomalib.cli import AnomalibCLI

from anomalib_mvfa.data import MedicalAD, MedicalFolder, ScanFolder, ScanReader
from anomalib_mvfa.data.readers import DEFAULT_READER
from anomalib_mvfa.errors import MvfaInputError

from .test_lightning import TINY_CLI
from .test_scan_folders import write_report

DATAMODULES = ("MedicalFolder", "ScanFolder", "MedicalAD")
# a value other than the default for each of ScanReader's settings
EVERY_SETTING = {
    "intensity": "window",
    "window": (0.0, 4.0),
    "percentiles": (1.0, 99.0),
    "slice_axis": "coronal",
    "time_point": 1,
    "skip_empty_slices": True,
    "non_image_files": "error",
    "max_decoded_bytes": 1_000_000,
}
# a volume of 8 x 6 x 3 voxels at two time points: all 0.2 at the first; at the second, axial slice 0
# holds only the background (0.1) and slices 1 and 2 tissue (0.8)
SHAPE = (8, 6, 3, 2)


def write_volume(path: Path) -> Path:
    values = np.full(SHAPE, 0.2, np.float32)
    values[..., 1] = 0.8
    values[:, :, 0, 1] = 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values, np.eye(4)), path)
    return path


def write_scans(root: Path, report: bool = False) -> Path:
    """The same volume in each of the three layouts under ``root``; with ``report``, a DICOM report beside it."""
    folders = [root / "folder" / "normal", root / "folder" / "abnormal", root / "scans"]
    folders += [
        root / "MVFA" / "Scans_AD" / split / label / "img"
        for split in ("valid", "test")
        for label in ("good", "Ungood")
    ]
    for folder in folders:
        write_volume(folder / f"{folder.parent.name}_{folder.name}.nii.gz")
        if report:
            write_report(folder / "report.dcm")
    return root


def build(kind: str, root: Path, reader: ScanReader | None) -> MedicalFolder | ScanFolder | MedicalAD:
    if kind == "MedicalFolder":
        return MedicalFolder(
            root=root / "folder", normal_dir="normal", abnormal_dir="abnormal", num_workers=0, reader=reader
        )
    if kind == "ScanFolder":
        return ScanFolder(root / "scans", num_workers=0, reader=reader)
    return MedicalAD(root=root / "MVFA", category="Scans", num_workers=0, reader=reader)


def read_samples(datamodule: MedicalFolder | ScanFolder | MedicalAD) -> dict[str, torch.Tensor]:
    """Every sample the datamodule's datasets list, read as those datasets read it."""
    datamodule.setup()
    if isinstance(datamodule, ScanFolder):
        data = datamodule.predict_data
        return {name: data[index].image for index, name in enumerate(data.image_filenames)}
    images = {}
    for dataset in (datamodule.train_data, datamodule.test_data):
        images.update({dataset[index].image_path: dataset[index].image for index in range(len(dataset))})
    return images


def cli_datamodule(kind: str, root: Path, tmp_path: Path, *reader_args: str) -> MedicalFolder | ScanFolder | MedicalAD:
    """The datamodule anomalib's command line builds (``run=False``: nothing trains)."""
    data_args = {
        "MedicalFolder": [
            "--data.root",
            str(root / "folder"),
            "--data.normal_dir",
            "normal",
            "--data.abnormal_dir",
            "abnormal",
        ],
        "ScanFolder": ["--data.path", str(root / "scans")],
        "MedicalAD": ["--data.root", str(root / "MVFA"), "--data.category", "Scans"],
    }[kind]
    args = [
        "train", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--data", f"anomalib_mvfa.data.{kind}", *data_args,
        "--data.num_workers", "0", *reader_args, "--default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    return AnomalibCLI(args=args, run=False).datamodule


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scans(tmp_path_factory.mktemp("scans"))


@pytest.mark.parametrize("kind", DATAMODULES)
def test_no_datamodule_repeats_the_reader_settings(kind) -> None:
    """``reader`` is the one place of the settings: none of them is an argument of its own."""
    parameters = inspect.signature(globals()[kind]).parameters
    assert parameters["reader"].default is None
    assert not {field.name for field in fields(ScanReader)} & set(parameters)


@pytest.mark.parametrize("kind", DATAMODULES)
def test_every_setting_reaches_each_datamodule_from_the_command_line(kind, scans, tmp_path) -> None:
    reader_args = [
        "--data.reader.intensity", "window", "--data.reader.window", "[0, 4]", "--data.reader.percentiles", "[1, 99]",
        "--data.reader.slice_axis", "coronal", "--data.reader.time_point", "1",
        "--data.reader.skip_empty_slices", "true", "--data.reader.non_image_files", "error",
        "--data.reader.max_decoded_bytes", "1000000",
    ]  # fmt: skip
    datamodule = cli_datamodule(kind, scans, tmp_path, *reader_args)
    assert type(datamodule).__name__ == kind
    assert isinstance(datamodule.reader, ScanReader)
    for name, value in EVERY_SETTING.items():
        assert getattr(datamodule.reader, name) == value, name
    # and what it reads: the six coronal slices of the second time point, through the window
    images = read_samples(datamodule)
    volume = next(name for name in images if name.endswith("#coronal=005"))
    assert len({name.split("#")[0] for name in images}) * 6 == len(images)
    assert torch.equal(images[volume], ScanReader(**EVERY_SETTING).read_image(volume))
    assert not torch.allclose(images[volume], ScanReader(slice_axis="coronal").read_image(volume))


@pytest.mark.parametrize("kind", DATAMODULES)
def test_the_command_line_without_reader_options_reads_with_the_default_reader(kind, scans, tmp_path) -> None:
    datamodule = cli_datamodule(kind, scans, tmp_path)
    assert datamodule.reader == DEFAULT_READER
    assert all(name.split("#")[1] in {"axial=000", "axial=001", "axial=002"} for name in read_samples(datamodule))


@pytest.mark.parametrize("kind", DATAMODULES)
def test_max_decoded_bytes_from_the_command_line_refuses_larger_volumes(kind, scans, tmp_path) -> None:
    """The volumes are 8 x 6 x 3 float32 voxels: streamed above 576 bytes, refused below their largest slice."""
    datamodule = cli_datamodule(kind, scans, tmp_path, "--data.reader.max_decoded_bytes", "150")
    assert datamodule.reader.max_decoded_bytes == 150
    message = (
        r"NIfTI '.*\.nii\.gz' declares 6 x 8 voxels x 4 bytes \(its largest slice, decoded\) = 192 bytes of decoded "
        r"pixel data, more than the reader's max_decoded_bytes=150 \(150 bytes\)"
    )
    with pytest.raises(MvfaInputError, match=message):
        datamodule.setup()


def test_a_config_file_nests_the_reader_settings(scans, tmp_path) -> None:
    config = tmp_path / "config.yaml"
    reader = {"intensity": "percentile", "percentiles": [5, 95], "slice_axis": "sagittal", "time_point": 1}
    data = {"class_path": "anomalib_mvfa.data.MedicalAD", "init_args": {"reader": reader}}
    config.write_text(yaml.safe_dump({"data": data}))
    datamodule = cli_datamodule("MedicalAD", scans, tmp_path, "--config", str(config))
    assert datamodule.reader == ScanReader(
        intensity="percentile", percentiles=(5, 95), slice_axis="sagittal", time_point=1
    )


@pytest.mark.parametrize("kind", DATAMODULES)
@pytest.mark.parametrize(
    ("settings", "slices"),
    [
        ({}, ["axial=000", "axial=001", "axial=002"]),
        ({"time_point": 1, "skip_empty_slices": True}, ["axial=001", "axial=002"]),
        ({"skip_empty_slices": True}, []),  # at the first time point every slice is background
        ({"slice_axis": "sagittal", "time_point": 1}, [f"sagittal={index:03d}" for index in range(8)]),
        ({"intensity": "window", "window": (0.0, 4.0), "time_point": 1}, ["axial=000", "axial=001", "axial=002"]),
        (
            {"intensity": "percentile", "percentiles": (10.0, 60.0), "time_point": 1},
            ["axial=000", "axial=001", "axial=002"],
        ),
    ],
)
def test_each_setting_reaches_what_each_datamodule_reads(kind, settings, slices, tmp_path) -> None:
    root = write_scans(tmp_path)
    reader = ScanReader(**settings)
    if not slices:
        with pytest.raises(MvfaInputError, match=r"holds no image|no readable file|No image"):
            read_samples(build(kind, root, reader))
        return
    images = read_samples(build(kind, root, reader))
    volumes = {name.split("#")[0] for name in images}
    assert sorted(images) == sorted(f"{volume}#{part}" for volume in volumes for part in slices)
    for name, image in images.items():
        assert torch.equal(image, reader.read_image(name)), name
    if settings.get("time_point") == 1:  # the second time point's values, not the first's
        name = next(name for name in images if name.endswith(slices[-1]))
        assert not torch.equal(images[name], ScanReader(**{**settings, "time_point": 0}).read_image(name))


@pytest.mark.parametrize("kind", DATAMODULES)
def test_each_datamodule_honours_non_image_files(kind, tmp_path) -> None:
    root = write_scans(tmp_path, report=True)
    names = read_samples(build(kind, root, None))
    assert names
    assert not any("report" in name for name in names)
    with pytest.raises(MvfaInputError, match=r"report\.dcm' holds no pixel data"):
        read_samples(build(kind, root, ScanReader(non_image_files="error")))


def test_medical_ad_reads_the_time_point_and_refuses_reports(tmp_path) -> None:
    """MedicalAD passes ``time_point`` and ``non_image_files`` to its reader, as the other datamodules do."""
    root = write_scans(tmp_path, report=True)
    datamodule = MedicalAD(root=root / "MVFA", category="Scans", num_workers=0, reader=ScanReader(time_point=1))
    datamodule.setup()
    image = datamodule.test_data[0].image  # axial slice 0: the background of the second time point
    assert datamodule.test_data[0].image_path.endswith("#axial=000")
    assert torch.equal(image, ScanReader(time_point=1).read_image(datamodule.test_data[0].image_path))
    assert image.std() == 0
    tissue = datamodule.test_data[1]  # axial slice 1: tissue at the second time point, brighter than slice 0
    assert tissue.image.mean() > image.mean()
    assert not torch.equal(tissue.image, ScanReader().read_image(tissue.image_path))  # not the first time point
    refusing = MedicalAD(root=root / "MVFA", category="Scans", reader=ScanReader(non_image_files="error"))
    with pytest.raises(MvfaInputError, match=r"report\.dcm' holds no pixel data"):
        refusing.setup()


def test_a_reader_that_is_not_a_scan_reader_is_refused_naming_it(tmp_path) -> None:
    with pytest.raises(MvfaInputError, match=r"reader must be a ScanReader .*got dict"):
        ScanFolder(tmp_path, reader={"intensity": "window"})  # type: ignore[arg-type]
    shutil.rmtree(tmp_path)
