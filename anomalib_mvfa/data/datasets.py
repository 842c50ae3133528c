"""anomalib datasets whose samples are read with :class:`~anomalib_mvfa.data.readers.ScanReader`.

- :class:`ScanDataset`: the base of the package's datasets: a samples table (anomalib's columns,
  with sample names such as ``brain.nii.gz#axial=080`` and ``source_file``), read with its reader.
- :func:`make_folder_samples`: the samples of anomalib's ``Folder`` layout (normal, abnormal,
  normal test and mask folders), masks paired with images by file name.
- :class:`ScanPredictDataset`: unlabelled scans of a folder, for prediction.
- :func:`split_by_source_file`: runs anomalib's split steps on whole files, so that the slices of
  one volume (the frames of one DICOM) never land in two splits.

Example:
    >>> from anomalib_mvfa.data.datasets import ScanPredictDataset
    >>> dataset = ScanPredictDataset("scans/")  # every image, DICOM and NIfTI slice  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataset, ImageItem, PredictDataset
from anomalib.data.utils import LabelName
from torchvision.transforms.v2 import Transform
from torchvision.tv_tensors import Mask

from .._compat import list_prediction_scans_with, read_predict_dataset_as
from ..errors import MvfaFileNotFoundError, MvfaInputError
from . import nifti
from .dicom import read_header
from .dicom_results import is_segmentation, segmentation_index
from .readers import DEFAULT_READER, SampleName, ScanReader, file_format, list_scan_files
from .series import Identity, series_identities

logger = logging.getLogger(__name__)

# Mask files may carry one of these after the image's name (``case1_mask.nii.gz`` for ``case1.nii.gz``).
MASK_NAME_ENDINGS = ("", "_mask", "_seg", "_label", "_labels", "_gt", "-mask")
_FORMAT_SUFFIX = re.compile(r"(\.nii\.gz|\.[A-Za-z0-9]+)$")


def file_key(path: str | Path) -> str:
    """A file's name without its format suffix (``.nii.gz`` counts as one), in lower case."""
    return _FORMAT_SUFFIX.sub("", Path(path).name).lower()


class ScanDataset(AnomalibDataset):
    """An anomalib dataset whose samples are read with a :class:`ScanReader`.

    Its samples table has anomalib's columns (``image_path`` holds sample names, which may name a
    frame or slice of a file) and ``source_file``.

    Args:
        reader: The reader; the default :class:`ScanReader` when ``None``.
        augmentations: Transforms applied to each item.
    """

    def __init__(self, reader: ScanReader | None = None, augmentations: Transform | None = None) -> None:
        super().__init__(augmentations=augmentations)
        self.reader = reader or DEFAULT_READER
        self._sample_table: pd.DataFrame | None = None

    @property
    def samples(self) -> pd.DataFrame:
        """The samples table, sorted by ``image_path``.

        Kept here rather than in anomalib's own storage: anomalib's setter requires every
        ``image_path`` to be a file, and a sample name may name a frame or slice of one
        (``scan.dcm#frame=003``); this setter checks the files the names refer to instead.

        Raises:
            RuntimeError: If no table was set yet.
        """
        if self._sample_table is None:
            msg = f"{type(self).__name__} has no samples table yet: assign one to `dataset.samples`."
            raise RuntimeError(msg)
        return self._sample_table

    @samples.setter
    def samples(self, samples: pd.DataFrame) -> None:
        files = {SampleName.parse(name).file for name in samples["image_path"]}
        missing = sorted(str(file) for file in files if not file.exists())
        if missing:
            msg = f"{len(missing)} file(s) of the samples do not exist, for example '{missing[0]}'."
            raise MvfaFileNotFoundError(msg)
        self._sample_table = samples.sort_values(by="image_path", ignore_index=True)

    def __getitem__(self, index: int) -> ImageItem:
        """Image (``[0, 1]``, three channels), label and mask (where there is one)."""
        sample = self.samples.iloc[index]
        image = self.reader.read_image(sample.image_path)
        mask_path = str(sample.get("mask_path", "") or "")
        gt_mask = None
        if mask_path:
            gt_mask = Mask(self.reader.read_mask(mask_path))
            if gt_mask.shape[-2:] != image.shape[-2:]:
                msg = (
                    f"Mask '{mask_path}' is {tuple(gt_mask.shape[-2:])} pixels but its image "
                    f"'{sample.image_path}' is {tuple(image.shape[-2:])}."
                )
                raise MvfaInputError(msg)
        elif self.task.value == "segmentation" and sample.label_index == LabelName.NORMAL:
            gt_mask = Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        if self.augmentations:
            if gt_mask is None:
                image = self.augmentations(image)
            else:
                image, gt_mask = self.augmentations(image, gt_mask)
        label = int(sample.label_index)
        return ImageItem(
            image=image,
            gt_mask=gt_mask,
            gt_label=None if label == LabelName.UNKNOWN else torch.tensor(label),
            image_path=sample.image_path,
            mask_path=mask_path,
        )


def mask_index(mask_folders: Sequence[Path]) -> dict[str, Path]:
    """Mask files by :func:`file_key`; each also under its key without a mask ending (``_mask``...).

    DICOM Segmentations are left out: they are paired by the images they reference (:func:`find_mask`).
    """
    masks: dict[str, Path] = {}
    for folder in mask_folders:
        for path in list_scan_files(folder):
            if file_format(path) == "dicom" and is_segmentation(path):
                continue
            masks.setdefault(file_key(path), path)
    for key, path in list(masks.items()):
        for ending in MASK_NAME_ENDINGS[1:]:
            if key.endswith(ending):
                masks.setdefault(key.removesuffix(ending), path)
    return masks


def segmentation_masks(mask_folders: Sequence[Path]) -> dict[str, Path]:
    """``{SOP Instance UID: Segmentation}`` of the DICOM Segmentations in ``mask_folders``."""
    return segmentation_index(path for folder in mask_folders for path in list_scan_files(folder))


def find_mask(path: Path, masks: dict[str, Path], references: dict[str, Path]) -> Path | str | None:
    """The mask of an abnormal file: by name (:func:`mask_index`), else the Segmentation that references it.

    A Segmentation's mask is named ``seg.dcm#sop=<the image's SOP Instance UID>``.
    """
    mask = masks.get(file_key(path))
    if mask is None and references and file_format(path) == "dicom":
        uid = str(read_header(path).get("SOPInstanceUID", ""))
        if uid in references:
            return str(SampleName(references[uid], reference=uid))
    return mask


def file_identities(reader: ScanReader, files: Sequence[Path]) -> dict[Path, Identity]:
    """The study and slice of the files of ``files`` in a DICOM series (none when ``reader.group_series`` is off)."""
    return series_identities(files, reader.budget) if reader.group_series else {}


def sample_identity(name: str | Path, identity: Identity | None = None) -> Identity:
    """The study and slice of one sample: its file's series identity, else its file and its frame or slice index.

    Example:
        >>> sample_identity("brain.nii.gz#axial=080")
        Identity(study='brain.nii.gz', slice=80)
    """
    sample = SampleName.parse(name)
    if identity is None:
        return Identity(str(sample.file), sample.index)
    return Identity(identity.study, identity.slice + sample.index)


def file_sample_rows(
    reader: ScanReader,
    path: Path,
    label: LabelName,
    split: str,
    mask: Path | str | None,
    root: Path,
    identity: Identity | None = None,
) -> list[dict[str, Any]]:
    """Rows of one file: one per sample, with the mask sample and the label each slice's mask gives.

    ``identity`` is the file's place in its DICOM series (:func:`file_identities`): each row's
    ``study`` and ``slice``.
    """
    names = reader.samples(path)
    masks = [""] * len(names)
    labels = [int(label)] * len(names)
    if isinstance(mask, str) and SampleName.parse(mask).reference is not None:
        # a DICOM Segmentation's mask of this image: the slice is abnormal where it marks a pixel, as NIfTI slices
        masks = [mask]
        labels = [int(LabelName.ABNORMAL if reader.read_mask(mask).any() else LabelName.NORMAL)]
    elif mask is not None:
        mask = Path(mask)
        if file_format(path) == "nifti":
            nifti.check_label_volume(path, mask)
            marked = nifti.marked_slices(mask, reader.slice_axis, reader.time_point, reader.budget)
            indices = [SampleName.parse(name).index for name in names]
            masks = [str(SampleName(mask, reader.slice_axis, index)) for index in indices]
            labels = [int(LabelName.ABNORMAL if marked[index] else LabelName.NORMAL) for index in indices]
        else:
            mask_names = reader.samples(mask)
            if len(mask_names) != len(names):
                msg = f"Mask '{mask}' holds {len(mask_names)} image(s) but its image '{path}' holds {len(names)}."
                raise MvfaInputError(msg)
            masks = mask_names
    return [
        {
            "path": str(root),
            "split": split,
            "label": "abnormal" if sample_label == LabelName.ABNORMAL else "normal",
            "image_path": name,
            "mask_path": mask_name,
            "label_index": sample_label,
            "source_file": str(path),
            "study": sample_identity(name, identity).study,
            "slice": sample_identity(name, identity).slice,
        }
        for name, mask_name, sample_label in zip(names, masks, labels, strict=True)
    ]


def _folders(root: Path | None, folders: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if folders is None:
        return []
    items = [folders] if isinstance(folders, str | Path) else list(folders)
    resolved = [Path(item) if root is None or Path(item).is_absolute() else root / item for item in items]
    for folder in resolved:
        if not folder.is_dir():
            msg = f"Folder '{folder}' does not exist."
            raise MvfaInputError(msg)
    return resolved


def make_folder_samples(
    reader: ScanReader,
    normal_dir: str | Path | Sequence[str | Path],
    root: str | Path | None = None,
    abnormal_dir: str | Path | Sequence[str | Path] | None = None,
    normal_test_dir: str | Path | Sequence[str | Path] | None = None,
    mask_dir: str | Path | Sequence[str | Path] | None = None,
    extensions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Samples of anomalib's ``Folder`` layout, every file expanded into its samples.

    Normal files are the ``train`` split, abnormal and normal-test files the ``test`` split.
    Masks are paired with abnormal files by name (``case1.png`` or ``case1_mask.png`` for
    ``case1.dcm``). Slices of an abnormal volume take their label from their label-volume slice:
    a slice without a marked voxel is normal.

    Raises:
        ValueError: If a folder is missing, holds no readable file, or (with ``mask_dir``) an
            abnormal file has no mask; the message names them.
    """
    root_path = Path(root) if root is not None else None
    groups = [
        (_folders(root_path, normal_dir), LabelName.NORMAL, "train"),
        (_folders(root_path, abnormal_dir), LabelName.ABNORMAL, "test"),
        (_folders(root_path, normal_test_dir), LabelName.NORMAL, "test"),
    ]
    if not groups[0][0]:
        msg = "normal_dir must name at least one folder of normal images."
        raise MvfaInputError(msg)
    mask_folders = _folders(root_path, mask_dir)
    masks = mask_index(mask_folders)
    references = segmentation_masks(mask_folders)
    rows: list[dict[str, Any]] = []
    for folders, label, split in groups:
        for folder in folders:
            files = list_scan_files(folder, tuple(extensions) if extensions else None)
            # a mask folder inside an image folder (abnormal/masks) holds no images
            files = [path for path in files if not any(path.is_relative_to(masked) for masked in mask_folders)]
            if not files:
                msg = f"Folder '{folder}' holds no readable file (images, DICOM or NIfTI)."
                raise MvfaInputError(msg)
            identities = file_identities(reader, files)
            for path in files:
                mask = find_mask(path, masks, references) if label == LabelName.ABNORMAL else None
                if label == LabelName.ABNORMAL and (masks or references) and mask is None:
                    msg = f"Abnormal file '{path}' has no mask in {mask_dir}: expected '{file_key(path)}.<suffix>'."
                    raise MvfaInputError(msg)
                identity = identities.get(path)
                rows.extend(file_sample_rows(reader, path, label, split, mask, root_path or folder, identity))
    if not rows:
        msg = f"No image in the folders {[str(folder) for folders, _, _ in groups for folder in folders]}."
        raise MvfaInputError(msg)
    samples = pd.DataFrame(rows)
    check_studies_in_one_folder(samples)
    samples.attrs["task"] = "segmentation" if (samples.mask_path != "").any() else "classification"
    return samples


def check_studies_in_one_folder(samples: pd.DataFrame) -> None:
    """Refuse a DICOM series whose files lie in several folders (normal and abnormal): it would be two studies.

    Raises:
        MvfaInputError: Naming the series and its folders.
    """
    folders = samples.groupby("study")["source_file"].agg(lambda files: sorted({str(Path(f).parent) for f in files}))
    for study, parents in folders.items():
        if len(parents) > 1:
            msg = (
                f"DICOM series '{study}' has files in {len(parents)} folders ({', '.join(parents)}): a series is one "
                "study and must lie in one folder. Move its files together, or read every file as an image of its "
                "own with --data.reader.group_series false."
            )
            raise MvfaInputError(msg)


class MedicalFolderDataset(ScanDataset):
    """One split (``"train"`` or ``"test"``) of :func:`make_folder_samples`.

    Example:
        >>> MedicalFolderDataset("train", normal_dir="scans/normal")  # doctest: +SKIP
    """

    def __init__(
        self,
        split: str,
        normal_dir: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        normal_test_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        extensions: Sequence[str] | None = None,
        reader: ScanReader | None = None,
        augmentations: Transform | None = None,
    ) -> None:
        super().__init__(reader=reader, augmentations=augmentations)
        self.samples = split_of(
            make_folder_samples(self.reader, normal_dir, root, abnormal_dir, normal_test_dir, mask_dir, extensions),
            split,
        )

    @classmethod
    def from_samples(cls, samples: pd.DataFrame, reader: ScanReader) -> MedicalFolderDataset:
        """A dataset of an existing samples table (one split of :func:`make_folder_samples`)."""
        dataset = cls.__new__(cls)
        ScanDataset.__init__(dataset, reader=reader)
        dataset.samples = samples
        return dataset


def split_of(samples: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split, keeping the table's task."""
    part = samples[samples.split == split].reset_index(drop=True)
    part.attrs["task"] = samples.attrs["task"]
    return part


def split_by_source_file(datamodule: Any, split_step: Callable[[], None]) -> None:
    """Run one of anomalib's split steps on whole files, then give each split its files' samples.

    anomalib splits samples at random; with several samples per file (slices of a volume,
    frames of a DICOM) or per study (the files of a DICOM series) that would put neighbouring
    slices of one scan into training and test. Here every dataset of ``datamodule`` is reduced to
    one row per study (its ``study`` column, else its source file; labelled abnormal when any of
    its samples is), ``split_step`` runs, and the rows come back.
    """
    names = ("train_data", "val_data", "test_data")
    datasets = [getattr(datamodule, name, None) for name in names]
    tables = [dataset.samples for dataset in datasets if isinstance(dataset, ScanDataset)]
    key = "study" if tables and all("study" in table for table in tables) else "source_file"
    if not tables or all(table[key].is_unique for table in tables):
        split_step()
        return
    every_sample = pd.concat(tables, ignore_index=True)
    task = tables[0].attrs.get("task", "classification")
    for dataset in datasets:
        if isinstance(dataset, ScanDataset):
            columns = {"path": "first", "split": "first", "label": "first", "label_index": "max", "mask_path": "first"}
            if key == "study":
                columns["source_file"] = "first"
            by_file = dataset.samples.groupby(key, as_index=False).agg(columns)
            by_file["image_path"] = by_file["source_file"]
            by_file.attrs["task"] = task
            dataset.samples = by_file
    split_step()
    for name in names:
        dataset = getattr(datamodule, name, None)
        if not isinstance(dataset, ScanDataset):
            continue
        files = set(dataset.samples[key])
        expanded = every_sample[every_sample[key].isin(files)].reset_index(drop=True)
        expanded.attrs["task"] = task
        dataset.samples = expanded


class ScanPredictDataset(PredictDataset):
    """Every sample (image, DICOM frame, NIfTI slice) of a folder or file, unlabelled, for prediction.

    Args:
        path: A folder (read recursively) or one file.
        reader: The reader; the default :class:`ScanReader` when ``None``.
        transform: Transform applied to each image.

    Example:
        >>> from anomalib.engine import Engine
        >>> Engine().predict(model, dataset=ScanPredictDataset("scans/"), ckpt_path="mvfa.ckpt")  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, reader: ScanReader | None = None, transform: Transform | None = None) -> None:
        path = Path(path)
        files = list_scan_files(path) if path.is_dir() else [path] if path.is_file() else []
        if not files:
            msg = f"'{path}' holds no readable file (images, DICOM or NIfTI)."
            raise MvfaInputError(msg)
        self.transform = transform
        self.reader = reader or DEFAULT_READER
        identities = file_identities(self.reader, files)
        self.identities: dict[str, Identity] = {}
        for file in files:
            for name in self.reader.samples(file):
                self.identities[name] = sample_identity(name, identities.get(file))
        self.image_filenames = list(self.identities)
        if not self.image_filenames:
            msg = f"'{path}' holds no image with the reader settings {self.reader}: every slice or frame was left out."
            raise MvfaInputError(msg)

    def __getitem__(self, index: int) -> ImageItem:
        """The sample's image, read with the reader."""
        name = self.image_filenames[index]
        image = self.reader.read_image(name)
        if self.transform:
            image = self.transform(image)
        return ImageItem(image=image, image_path=str(name))


def refuse_left_out_scans(image_filenames: Sequence[str | Path]) -> None:
    """Refuse a prediction folder whose DICOM or NIfTI files anomalib's own listing left out.

    ``anomalib predict --data <folder>`` lists the folder with anomalib's image suffixes before any
    part of this package runs: DICOM and NIfTI files beside the images would be skipped silently.
    The folder the listed files share is listed again with this package's formats (not when one
    file is listed: it may have been named alone).

    Raises:
        MvfaInputError: Naming the folder, the files left out and ``ScanFolder``, which reads them.

    Example:
        >>> refuse_left_out_scans([])  # nothing listed: nothing to compare
    """
    paths = [Path(name) for name in image_filenames]
    if len(paths) < 2:  # nothing listed, or one file that may have been named alone
        return
    folder = Path(os.path.commonpath([str(path.parent) for path in paths]))
    listed = {path.resolve() for path in paths}
    left_out = [path for path in folder.rglob("*") if path.is_file() and path.resolve() not in listed]
    scans = sorted(path for path in left_out if file_format(path) in {"dicom", "nifti"})
    if scans:
        shown = ", ".join(str(path) for path in scans[:3]) + (" ..." if len(scans) > 3 else "")
        msg = (
            f"anomalib's prediction listing of '{folder}' left out {len(scans)} DICOM or NIfTI file(s) ({shown}): "
            f"it lists images only. Predict with this package's datamodule instead, which reads every format: "
            f"--data anomalib_mvfa.data.ScanFolder --data.root {folder}"
        )
        raise MvfaInputError(msg)


def adopt_prediction_datasets(dataloaders: Any) -> int:
    """Read anomalib's own prediction datasets (``--data <folder>``) with this package's reader.

    anomalib's ``PredictDataset`` reads with anomalib's reader, which saturates 16-bit images.
    Each one among ``dataloaders`` reads its files as a :class:`ScanPredictDataset` with the default
    :class:`ScanReader` (:func:`anomalib_mvfa._compat.read_predict_dataset_as` says why it is done in
    place). Returns how many were adopted.

    Example:
        >>> adopt_prediction_datasets(None)
        0
    """
    if dataloaders is None:
        return 0
    if isinstance(dataloaders, dict):
        dataloaders = list(dataloaders.values())
    elif not isinstance(dataloaders, list | tuple):  # Lightning gives one loader as itself: never iterate it
        dataloaders = [dataloaders]
    adopted = 0
    for loader in dataloaders:
        dataset = getattr(loader, "dataset", None)
        if type(dataset) is PredictDataset:
            refuse_left_out_scans(dataset.image_filenames)
            read_predict_dataset_as(dataset, ScanPredictDataset)
            dataset.reader = DEFAULT_READER
            adopted += 1
    if adopted:
        logger.info("Prediction images are read with anomalib_mvfa's reader (16-bit aware, every image mode).")
    return adopted


# ``anomalib predict --data <folder>`` of DICOM or NIfTI files (which anomalib's listing refuses) reads them
# with ScanPredictDataset (see anomalib_mvfa._compat.list_prediction_scans_with)
list_prediction_scans_with(ScanPredictDataset)
