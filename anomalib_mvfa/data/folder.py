r"""Datamodules for any folder of scans: :class:`MedicalFolder` (labelled) and :class:`ScanFolder` (prediction).

:class:`MedicalFolder` takes the arguments of anomalib's ``Folder`` and reads every file with
:class:`~anomalib_mvfa.data.readers.ScanReader`: 8- and 16-bit PNG/TIFF in every image mode,
DICOM (one sample per frame; the single-frame files of a series are one volume in anatomical order,
:mod:`~anomalib_mvfa.data.series`) and NIfTI (one sample per slice). anomalib's random splits are made
on whole studies (a NIfTI file, a DICOM series), so the slices of one volume stay in one split.

Example:
    >>> from anomalib_mvfa.data import MedicalFolder, ScanReader
    >>> datamodule = MedicalFolder(
    ...     root="scans", normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks",
    ...     reader=ScanReader(intensity="window", window=(40, 80)),
    ... )  # doctest: +SKIP

    From the command line::

        anomalib train --model anomalib_mvfa.Mvfa --data anomalib_mvfa.data.MedicalFolder \\
            --data.root scans --data.normal_dir normal --data.abnormal_dir abnormal --data.mask_dir masks \\
            --data.reader.intensity window --data.reader.window "[40, 80]"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomalib.data import AnomalibDataModule, Folder
from anomalib.data.utils import TestSplitMode, ValSplitMode
from anomalib.utils.attrs import get_nested_attr
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Transform

from ..errors import MvfaInputError
from .datasets import MedicalFolderDataset, ScanPredictDataset, make_folder_samples, split_by_source_file, split_of
from .readers import ScanReader, file_format, resolve_reader


class MedicalFolder(Folder):
    """anomalib's ``Folder`` datamodule reading DICOM, NIfTI and every image mode right.

    Args:
        normal_dir: Folder(s) of normal files (the training split).
        root: Folder the other folders are relative to.
        abnormal_dir: Folder(s) of abnormal files (test split).
        normal_test_dir: Folder(s) of normal test files.
        mask_dir: Folder(s) of masks, paired by name (``case1.png`` or ``case1_mask.nii.gz``).
        name: Name used in anomalib's result folders.
        normal_split_ratio: As in anomalib's ``Folder``.
        extensions: Only files ending in one of these (``[".dcm"]``); every readable file when ``None``.
        reader: How files become images (intensity, NIfTI slicing, DICOM files without pixels);
            the default :class:`~anomalib_mvfa.data.readers.ScanReader` when ``None``. From the
            command line: ``--data.reader.intensity window --data.reader.window "[40, 80]"``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data-loading workers.
        augmentations: Transforms applied to every split.
        test_split_mode: As in anomalib's ``Folder``.
        test_split_ratio: As in anomalib's ``Folder``.
        val_split_mode: As in anomalib's ``Folder``.
        val_split_ratio: As in anomalib's ``Folder``.
        seed: Seed of the splits.
    """

    def __init__(
        self,
        normal_dir: str | Path | Sequence[str | Path],
        root: str | Path | None = None,
        abnormal_dir: str | Path | Sequence[str | Path] | None = None,
        normal_test_dir: str | Path | Sequence[str | Path] | None = None,
        mask_dir: str | Path | Sequence[str | Path] | None = None,
        name: str = "MedicalFolder",
        normal_split_ratio: float = 0.2,
        extensions: Sequence[str] | None = None,
        reader: ScanReader | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.FROM_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            name=name,
            normal_dir=normal_dir,
            root=root,
            abnormal_dir=abnormal_dir,
            normal_test_dir=normal_test_dir,
            mask_dir=mask_dir,
            normal_split_ratio=normal_split_ratio,
            extensions=tuple(extensions) if extensions else None,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )
        self.reader = resolve_reader(reader)

    def _setup(self, _stage: str | None = None) -> None:
        samples = make_folder_samples(
            self.reader,
            self.normal_dir,
            self.root,
            self.abnormal_dir,
            self.normal_test_dir,
            self.mask_dir,
            self.extensions,
        )
        self.train_data = MedicalFolderDataset.from_samples(split_of(samples, "train"), self.reader)
        self.test_data = MedicalFolderDataset.from_samples(split_of(samples, "test"), self.reader)

    def _refuse_synthetic_splits(self) -> None:
        """Refuse synthetic splits of scans: anomalib makes them with its own reader (plain one-image files only)."""
        modes = {"test_split_mode": self.test_split_mode, "val_split_mode": self.val_split_mode}
        synthetic = [name for name, mode in modes.items() if str(getattr(mode, "value", mode)) == "synthetic"]
        if not synthetic:
            return
        samples = self.train_data.samples
        scans = [name for name in samples.image_path if file_format(name) != "image" or "#" in Path(name).name]
        if scans:
            msg = (
                f"{synthetic[0]}='synthetic' makes anomalies in files read with anomalib's reader, which cannot read "
                f"'{scans[0]}' (DICOM, NIfTI, frames). Use Mvfa's abnormal_source='synthetic' for synthetic support "
                "images, and a split of real images for testing."
            )
            raise MvfaInputError(msg)

    def _create_test_split(self) -> None:
        self._refuse_synthetic_splits()
        split_by_source_file(self, super()._create_test_split)

    def _create_val_split(self) -> None:
        split_by_source_file(self, super()._create_val_split)


class ScanFolder(AnomalibDataModule):
    r"""Unlabelled scans of a folder (or one file), for ``anomalib predict``.

    Every image, DICOM frame and NIfTI slice under ``path`` is one prediction sample.

    Args:
        path: Folder (read recursively) or file.
        reader: As in :class:`MedicalFolder`; use the settings the model was trained with.
        eval_batch_size: Prediction batch size.
        num_workers: Data-loading workers.

    Example:
        From the command line::

            anomalib predict --model anomalib_mvfa.Mvfa --ckpt_path model.ckpt \\
                --data anomalib_mvfa.data.ScanFolder --data.path scans/
    """

    def __init__(
        self,
        path: str | Path,
        reader: ScanReader | None = None,
        eval_batch_size: int = 32,
        num_workers: int = 8,
    ) -> None:
        super().__init__(
            train_batch_size=eval_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            val_split_mode=ValSplitMode.NONE,
            test_split_mode=TestSplitMode.NONE,
        )
        self.path = Path(path)
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.reader = resolve_reader(reader)

    @property
    def name(self) -> str:
        """Name used in anomalib's result folders."""
        return "ScanFolder"

    def setup(self, stage: str | None = None) -> None:
        """List the samples (once)."""
        del stage
        if not hasattr(self, "predict_data"):
            self.predict_data = ScanPredictDataset(self.path, reader=self.reader)

    def _setup(self, _stage: str | None = None) -> None:
        self.setup()

    def predict_dataloader(self) -> DataLoader:
        """The samples in name order."""
        self.setup()
        transform = get_nested_attr(self, "trainer.model.pre_processor.transform", None)
        if transform is not None:  # resized before batching, as anomalib does for its datamodules
            self.predict_data.transform = transform
        return DataLoader(
            self.predict_data,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.predict_data.collate_fn,
        )

    def _refuse(self) -> DataLoader:
        msg = "ScanFolder holds unlabelled scans for prediction; use MedicalFolder to train, validate or test."
        raise RuntimeError(msg)

    def train_dataloader(self) -> DataLoader:
        """Refused: ScanFolder is for prediction."""
        return self._refuse()

    def val_dataloader(self) -> DataLoader:
        """Refused: ScanFolder is for prediction."""
        return self._refuse()

    def test_dataloader(self) -> DataLoader:
        """Refused: ScanFolder is for prediction."""
        return self._refuse()
