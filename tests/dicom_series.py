"""Synthetic CT series made from pydicom's ``CT_small.dcm``: one file per slice, on an oblique axis.

Each slice is a copy of the test file with its own ``SOPInstanceUID``, a shared ``SeriesInstanceUID``
and ``FrameOfReferenceUID``, an ``ImagePositionPatient`` along the normal of an oblique
``ImageOrientationPatient``, an ``InstanceNumber`` and pixels of its own (a bright square where the
slice has a lesion). Files are written under names that do not tell their order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

SPACING = 2.5  # mm between slices along the normal


def oblique_axes(rng: np.random.Generator) -> np.ndarray:
    """Orthonormal row, column and normal directions of a random oblique plane (columns of a rotation)."""
    matrix, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(matrix) < 0:
        matrix[:, 2] *= -1
    return matrix


@dataclass
class WrittenSeries:
    """What :func:`write_ct_series` wrote: files in anatomical order, their masks, and the series' UIDs."""

    uid: str
    files: list[Path]  # anatomical order (along the slice normal)
    masks: list[np.ndarray]  # one per file, rows x columns, 0/1
    datasets: list[pydicom.Dataset] = field(repr=False)
    frame_of_reference: str = ""


def write_ct_series(
    folder: Path,
    rng: np.random.Generator,
    slices: int = 6,
    lesions: tuple[int, ...] = (),
    instance_numbers: list[int] | None = None,
    study_uid: str | None = None,
) -> WrittenSeries:
    """Write a CT series of ``slices`` files in shuffled order; slices in ``lesions`` hold a bright square.

    ``instance_numbers`` (one per slice in anatomical order) default to a shuffled order, so that only
    the positions tell the anatomical one.
    """
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    axes = oblique_axes(rng)
    origin = rng.uniform(-150, 150, 3)
    uid, frame_of_reference = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    numbers = instance_numbers or [int(n) + 1 for n in rng.permutation(slices)]
    names = rng.permutation(10_000)[:slices]
    base = template.pixel_array.astype(np.int32)
    files, masks, datasets = [], [], []
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(slices):
        dataset = copy.deepcopy(template)
        dataset.SeriesInstanceUID, dataset.StudyInstanceUID = uid, study_uid
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.ImageOrientationPatient = [round(float(v), 6) for v in (*axes[:, 0], *axes[:, 1])]
        dataset.ImagePositionPatient = [round(float(v), 4) for v in origin + index * SPACING * axes[:, 2]]
        dataset.InstanceNumber = numbers[index]
        pixels = base + rng.integers(-40, 40, base.shape)
        mask = np.zeros(base.shape, np.uint8)
        if index in lesions:
            row, column = rng.integers(20, base.shape[0] - 50, 2)
            mask[row : row + 24, column : column + 24] = 1
            pixels[mask > 0] = 2600
        dataset.PixelData = pixels.astype(np.int16).tobytes()
        path = folder / f"IM{names[index]:05d}.dcm"
        dataset.save_as(path)
        files.append(path)
        masks.append(mask)
        datasets.append(dataset)
    return WrittenSeries(uid, files, masks, datasets, frame_of_reference)


def write_png_masks(series: WrittenSeries, folder: Path) -> list[Path]:
    """The series' masks as PNG files named after their DICOM files (``IM01234.png``)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path, mask in zip(series.files, series.masks, strict=True):
        paths.append(folder / f"{path.stem}.png")
        Image.fromarray(mask * 255).save(paths[-1])
    return paths
