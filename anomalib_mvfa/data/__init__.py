"""Data modules for MVFA's medical benchmark layout.

Example:
    >>> from anomalib_mvfa.data import MedicalAD
    >>> datamodule = MedicalAD(root="datasets/MVFA", category="Brain")  # doctest: +SKIP
"""

from .medical import (
    MEDICAL_CATEGORIES,
    SEGMENTATION_CATEGORIES,
    MedicalAD,
    MedicalADDataset,
    parse_seed_file,
    read_medical_image,
)

__all__ = [
    "MEDICAL_CATEGORIES",
    "SEGMENTATION_CATEGORIES",
    "MedicalAD",
    "MedicalADDataset",
    "parse_seed_file",
    "read_medical_image",
]
