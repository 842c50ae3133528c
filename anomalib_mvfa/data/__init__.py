"""Data: the package's reader of images, DICOM and NIfTI, and its datamodules.

- :class:`ScanReader`, :func:`read_image`, :func:`read_mask`: the one reader every data path uses; every
  datamodule takes one as ``reader`` (:func:`reader_of` gives a datamodule's).
- :class:`MedicalAD`: MVFA's medical benchmark layout.
- :class:`MedicalFolder`: anomalib's ``Folder`` layout for any folder of scans.
- :class:`ScanFolder`, :class:`ScanPredictDataset`: unlabelled scans for prediction.
- :class:`VolumeMapWriter`: anomaly maps of NIfTI volumes written back as volumes, and of DICOM series as a
  DICOM Segmentation and Parametric Map (:mod:`~anomalib_mvfa.data.dicom_results`).
- :mod:`~anomalib_mvfa.data.series`: single-frame DICOM files grouped into series, in anatomical order.

Example:
    >>> from anomalib_mvfa.data import MedicalAD, MedicalFolder
    >>> datamodule = MedicalAD(root="datasets/MVFA", category="Brain")  # doctest: +SKIP
    >>> scans = MedicalFolder(root="scans", normal_dir="normal", abnormal_dir="abnormal")  # doctest: +SKIP
"""

from .datasets import MedicalFolderDataset, ScanDataset, ScanPredictDataset
from .folder import MedicalFolder, ScanFolder
from .intensity import INTENSITY_MODES, Intensity
from .medical import (
    MEDICAL_CATEGORIES,
    SEGMENTATION_CATEGORIES,
    MedicalAD,
    MedicalADDataset,
    parse_seed_file,
)
from .readers import SCAN_SUFFIXES, SampleName, ScanReader, file_format, read_image, read_mask, reader_of
from .volumes import VolumeMapWriter

__all__ = [
    "INTENSITY_MODES",
    "MEDICAL_CATEGORIES",
    "SCAN_SUFFIXES",
    "SEGMENTATION_CATEGORIES",
    "Intensity",
    "MedicalAD",
    "MedicalADDataset",
    "MedicalFolder",
    "MedicalFolderDataset",
    "SampleName",
    "ScanDataset",
    "ScanFolder",
    "ScanPredictDataset",
    "ScanReader",
    "VolumeMapWriter",
    "file_format",
    "parse_seed_file",
    "read_image",
    "read_mask",
    "reader_of",
]
