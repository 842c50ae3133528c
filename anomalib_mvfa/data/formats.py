"""Which reader a file needs, told by its name (and, for a file without a suffix, its DICOM marker).

Example:
    >>> from anomalib_mvfa.data.formats import file_format
    >>> file_format("brain.nii.gz"), file_format("scan.PNG")
    ('nifti', 'image')
"""

from __future__ import annotations

from pathlib import Path

from . import dicom, image_io, nifti


def file_format(path: str | Path) -> str | None:
    """``"image"``, ``"dicom"``, ``"nifti"``, or ``None`` for a file of none of them."""
    lower = str(path).lower()
    if lower.endswith(nifti.NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(dicom.DICOM_SUFFIXES):
        return "dicom"
    if lower.endswith(image_io.PLAIN_SUFFIXES):
        return "image"
    if not Path(path).suffix or Path(path).suffix.lower() in {".ima", ".img"}:
        return "dicom" if dicom.is_dicom_file(path) else None
    return None
