"""The package's one reader: 2D images, DICOM and NIfTI, each file as one or several samples.

A sample is named by a string: the file's path, followed for the files that hold several images
by ``#<part>=<index>``: ``scan.dcm#frame=3`` (frame 3 of a multi-frame DICOM, page 3 of a TIFF),
``brain.nii.gz#axial=80`` (axial slice 80 of a volume). :meth:`ScanReader.samples` lists the
samples of a file; :meth:`ScanReader.read_image` and :meth:`ScanReader.read_mask` read one.

Formats are told by the file name (``.dcm``/``.dicom``, ``.nii``/``.nii.gz``, the 2D suffixes of
:data:`~anomalib_mvfa.data.image_io.PLAIN_SUFFIXES`, any letter case), and files without a suffix by
their content (DICOM's ``DICM`` marker), as hospitals export them.

Example:
    >>> from anomalib_mvfa.data import ScanReader
    >>> reader = ScanReader(intensity="window", window=(40, 80))  # a brain CT window
    >>> names = reader.samples("series/IM0001")  # ['series/IM0001'] or its frames  # doctest: +SKIP
    >>> image = reader.read_image(names[0])  # 3 x H x W in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MvfaInputError
from . import dicom, image_io, nifti
from .budget import default_max_decoded_bytes, human_bytes
from .formats import file_format
from .intensity import Intensity

logger = logging.getLogger(__name__)

SCAN_SUFFIXES = (*image_io.PLAIN_SUFFIXES, *dicom.DICOM_SUFFIXES, *nifti.NIFTI_SUFFIXES)
NON_IMAGE_CHOICES = ("skip", "error")
_PART = re.compile(r"^(?P<file>.+)#(?P<part>frame|axial|coronal|sagittal)=(?P<index>\d+)$")
# The mask a DICOM Segmentation holds for one source image: ``seg.dcm#sop=<SOP Instance UID>``
_REFERENCE = re.compile(r"^(?P<file>.+)#sop=(?P<uid>[0-9.]+)$")
# A mask that is not binary counts pixels at or above this share of its value range as abnormal.
MASK_THRESHOLD = 0.5
# Most distinct values a mask may hold to be read as a label map (0 and a few labels).
MAX_LABELS = 16


@dataclass(frozen=True)
class SampleName:
    """A file and, for files of several images, which one (``part`` and ``index``).

    A DICOM Segmentation's mask of one source image is named by that image's SOP Instance UID
    (``reference``): ``seg.dcm#sop=1.2.826...``.
    """

    file: Path
    part: str | None = None
    index: int = 0
    reference: str | None = None

    @classmethod
    def parse(cls, name: str | Path) -> SampleName:
        """Split ``"scan.dcm#frame=3"`` or ``"seg.dcm#sop=1.2.3"``; a name that is an existing file is taken whole."""
        text = str(name)
        if Path(text).exists():
            return cls(Path(text))
        reference = _REFERENCE.match(text)
        if reference is not None:
            return cls(Path(reference["file"]), reference=reference["uid"])
        match = _PART.match(text)
        if match is None:
            return cls(Path(text))
        return cls(Path(match["file"]), match["part"], int(match["index"]))

    def __str__(self) -> str:
        """The name as samples tables hold it."""
        if self.reference is not None:
            return f"{self.file}#sop={self.reference}"
        return str(self.file) if self.part is None else f"{self.file}#{self.part}={self.index:03d}"

    @property
    def display_name(self) -> str:
        """A file name for pictures of this sample: ``brain.nii.gz_axial080.png``, ``scan.dcm.png``."""
        name = self.file.name
        if self.part is not None:
            name = f"{name}_{self.part}{self.index:03d}"
        return name if name.lower().endswith(image_io.DISPLAY_SUFFIXES) else f"{name}.png"


def list_scan_files(
    folder: str | Path, extensions: tuple[str, ...] | None = None, recursive: bool = True
) -> list[Path]:
    """Files of ``folder`` (sorted; its sub-folders too when ``recursive``) in a readable format.

    With ``extensions``, the files whose names end in one of them (any letter case) instead.
    """
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(path for path in found if path.is_file() and not path.name.startswith("."))
    if extensions:
        wanted = tuple(extension.lower() for extension in extensions)
        return [path for path in files if path.name.lower().endswith(wanted)]
    return [path for path in files if file_format(path) is not None]


@dataclass(frozen=True)
class ScanReader:
    """Reads every format of the package the same way; the one reader setting of every datamodule.

    ``MedicalFolder``, ``ScanFolder`` and ``MedicalAD`` take it as ``reader``; on anomalib's command
    line its fields are nested options: ``--data.reader.intensity window --data.reader.window "[40, 80]"``,
    or in a config file ``data: {init_args: {reader: {intensity: window, window: [40, 80]}}}``.

    Args:
        intensity: ``"auto"``, ``"range"``, ``"bits"``, ``"window"`` or ``"percentile"``
            (:mod:`anomalib_mvfa.data.intensity`).
        window: ``(centre, width)`` for ``"window"`` (Hounsfield units for CT).
        percentiles: ``(low, high)`` for ``"percentile"`` and ``"auto"``.
        slice_axis: NIfTI slicing axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        time_point: Time point of 4D NIfTI volumes.
        skip_empty_slices: Leave out NIfTI slices that hold only the volume's background value.
        non_image_files: DICOM files without pixel data (reports, presentation states):
            ``"skip"`` (with a warning naming them) or ``"error"``.
        max_decoded_bytes: The most bytes of decoded pixel data one file may declare (DICOM rows x
            columns x frames x samples x bytes, NIfTI voxels of its largest slice x 4 bytes (a larger
            volume is streamed), PNG/TIFF pixels x bands x bytes); a file above it is refused, naming
            it, before anything is allocated for it (:mod:`~anomalib_mvfa.data.budget`). ``None`` (the
            default) is a sixty-fourth of the physical memory: a read holds several float32 copies of
            the data, so a file at the limit needs about a fifth of the memory.
            ``--data.reader.max_decoded_bytes 4000000000`` on the command line.
        group_series: Group single-frame DICOM files by ``SeriesInstanceUID`` into volumes in
            anatomical order (:mod:`~anomalib_mvfa.data.series`): every slice stays a sample, and
            a series is one study (splits, study scores, DICOM results). ``False`` reads every
            file as an image of its own.

    Example:
        >>> reader = ScanReader(slice_axis="coronal", skip_empty_slices=True)
        >>> ScanReader(max_decoded_bytes=2**30).budget
        1073741824
    """

    intensity: str = "auto"
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    slice_axis: str = "axial"
    time_point: int = 0
    skip_empty_slices: bool = False
    non_image_files: str = "skip"
    max_decoded_bytes: int | None = None
    group_series: bool = True
    _intensity: Intensity = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """Validate the settings, naming the bad one."""
        intensity = Intensity(self.intensity, self.window, tuple(self.percentiles))
        object.__setattr__(self, "_intensity", intensity)
        object.__setattr__(self, "window", intensity.window)  # lists from a config become tuples
        object.__setattr__(self, "percentiles", intensity.percentiles)
        if self.slice_axis not in nifti.SLICE_AXES:
            msg = f"slice_axis must be one of {tuple(nifti.SLICE_AXES)}, got {self.slice_axis!r}."
            raise MvfaInputError(msg)
        if self.non_image_files not in NON_IMAGE_CHOICES:
            msg = f"non_image_files must be one of {NON_IMAGE_CHOICES}, got {self.non_image_files!r}."
            raise MvfaInputError(msg)
        if self.time_point < 0:
            msg = f"time_point must be 0 or more, got {self.time_point}."
            raise MvfaInputError(msg)
        if self.max_decoded_bytes is not None and not self.max_decoded_bytes > 0:
            msg = f"max_decoded_bytes must be above 0 (or None for the default), got {self.max_decoded_bytes}."
            raise MvfaInputError(msg)

    @property
    def budget(self) -> int:
        """``max_decoded_bytes``, or the default share of the physical memory when it is ``None``."""
        return default_max_decoded_bytes() if self.max_decoded_bytes is None else int(self.max_decoded_bytes)

    @property
    def intensity_setting(self) -> Intensity:
        """The intensity settings as one object."""
        return self._intensity

    def samples(self, path: str | Path) -> list[str]:
        """Names of the samples of one file: itself, its frames or pages, or its slices.

        A DICOM file without pixel data gives none under ``non_image_files="skip"``.

        Raises:
            ValueError: If the file's format is unknown, or it has no pixel data under
                ``non_image_files="error"``.
        """
        kind = file_format(path)
        if kind == "nifti":
            count = nifti.slice_count(path, self.slice_axis, self.time_point, self.budget)
            empty = (
                set(nifti.empty_slices(path, self.slice_axis, self.time_point, self.budget))
                if self.skip_empty_slices
                else set()
            )
            return [str(SampleName(Path(path), self.slice_axis, i)) for i in range(count) if i not in empty]
        if kind is None:
            msg = f"'{path}' is not a file of a known format: expected {SCAN_SUFFIXES} or a DICOM file."
            raise MvfaInputError(msg)
        count = self._frame_count(path, kind)
        if count == 1:
            return [str(path)]
        return [str(SampleName(Path(path), "frame", i)) for i in range(count)]

    def _frame_count(self, path: str | Path, kind: str) -> int:
        """Frames of a DICOM file or pages of a TIFF; 1 for a file that cannot be read (checked before a run)."""
        if kind == "image" and not str(path).lower().endswith((".tif", ".tiff")):  # the formats with pages
            return 1
        try:
            count = dicom.dicom_frame_count(path, self.budget) if kind == "dicom" else image_io.page_count(path)
        except ValueError:  # unreadable or declaring more than it holds: one sample, which the checks before a run name
            return 1
        if count == 0:
            if self.non_image_files == "error":
                msg = f"DICOM '{path}' holds no pixel data (a report or presentation state?): it has no image."
                raise MvfaInputError(msg)
            logger.warning("DICOM '%s' holds no pixel data (a report or presentation state?): skipped.", path)
        return count

    def _values(self, name: str | Path) -> np.ndarray:
        sample = SampleName.parse(name)
        kind = file_format(sample.file)
        if kind == "nifti":
            if sample.part in {None, "frame"}:
                msg = f"'{name}' names a NIfTI volume: name one slice, for example '{sample.file}#axial=0'."
                raise MvfaInputError(msg)
            return nifti.read_nifti_slice(
                sample.file, sample.part, sample.index, self._intensity, self.time_point, self.budget
            )
        if kind == "dicom":
            return dicom.read_dicom(sample.file, sample.index, self._intensity, self.budget)
        if kind == "image":
            return image_io.read_plain_image(sample.file, sample.index, self._intensity, self.budget)
        if not sample.file.exists():
            msg = f"Image '{sample.file}' does not exist."
            raise MvfaInputError(msg)
        msg = f"'{sample.file}' is not a file of a known format: expected {SCAN_SUFFIXES} or a DICOM file."
        raise MvfaInputError(msg)

    def read_image(self, name: str | Path) -> torch.Tensor:
        """One sample as a ``3 x H x W`` float tensor in ``[0, 1]``.

        Raises:
            ValueError: If it cannot be read, naming the file and why.
        """
        try:
            values = self._values(name)
            return torch.from_numpy(np.ascontiguousarray(values)).permute(2, 0, 1).contiguous()
        except MemoryError as error:  # within the budget, but more than this process may take
            msg = (
                f"Reading '{name}' ran out of memory: its declared size was within the reader's "
                f"max_decoded_bytes={self.budget} ({human_bytes(self.budget)}), and a read holds up to about 13 bytes "
                "per decoded byte. Lower --data.reader.max_decoded_bytes (ScanReader(max_decoded_bytes=...)) so that "
                "such files are refused before they are read, or give the process more memory."
            )
            raise MvfaInputError(msg) from error

    def image_size(self, name: str | Path) -> tuple[int, int]:
        """``(height, width)`` of a sample, from the header where the format allows."""
        sample = SampleName.parse(name)
        kind = file_format(sample.file)
        if kind == "image":
            return image_io.plain_image_size(sample.file)
        if kind == "dicom":
            return dicom.dicom_size(sample.file)
        if kind == "nifti" and sample.part in nifti.SLICE_AXES:
            shape = nifti.canonical_shape(sample.file, self.time_point)
            rest = [size for axis, size in enumerate(shape) if axis != nifti.SLICE_AXES[sample.part]]
            return rest[1], rest[0]
        return tuple(self.read_image(name).shape[-2:])  # type: ignore[return-value]

    def read_mask(self, name: str | Path) -> torch.Tensor:
        """One mask as an ``H x W`` uint8 tensor of 0 and 1 (see :func:`read_mask`)."""
        return read_mask(name, self.time_point, self.budget)


def _mask_fractions(
    name: str | Path, time_point: int, max_decoded_bytes: int | None
) -> tuple[np.ndarray, float] | np.ndarray:
    sample = SampleName.parse(name)
    kind = file_format(sample.file)
    if kind == "nifti" and sample.part in nifti.SLICE_AXES:
        return nifti.read_nifti_mask_slice(sample.file, sample.part, sample.index, time_point, max_decoded_bytes)
    if kind == "dicom" and sample.reference is not None:
        from .dicom_results import read_segmentation_mask  # noqa: PLC0415 - highdicom, only for Segmentations

        return read_segmentation_mask(sample.file, sample.reference)
    if kind == "dicom":
        values = dicom.read_dicom_stored(sample.file, sample.index, max_decoded_bytes)
        return (values.reshape(values.shape[0], values.shape[1], -1) != 0).any(axis=-1).astype(np.uint8)
    if kind == "image" or (kind is None and sample.file.exists()):
        return image_io.mask_values(sample.file, sample.index, max_decoded_bytes)
    msg = f"Mask '{name}' cannot be read: expected an image, DICOM or NIfTI file."
    raise MvfaInputError(msg)


def read_mask(name: str | Path, time_point: int = 0, max_decoded_bytes: int | None = None) -> torch.Tensor:
    """Read a mask sample as an ``H x W`` uint8 tensor of 0 and 1.

    NIfTI label volumes and DICOM masks: every non-zero value is 1; a DICOM Segmentation's mask of one
    source image (``seg.dcm#sop=<SOP Instance UID>``): every segment. Image files: every channel
    that varies counts, alpha included (an annotation drawn in green, blue or alpha alone is read);
    a mask holding 0 and one other value marks the pixels of that value abnormal, whatever it is
    (1, 255, 65535); a label map (a few small integer labels, all below half of the value range,
    such as 0/1/2) marks every non-zero label abnormal, with a warning naming the labels; other
    masks (anti-aliased edges, JPEG) are binarised at :data:`MASK_THRESHOLD` of their value range
    (128 for 8-bit files), and a warning says so. The EXIF orientation is applied, as to images.

    Raises:
        ValueError: If the file cannot be decoded, naming it.
    """
    read = _mask_fractions(name, time_point, max_decoded_bytes)
    if not isinstance(read, tuple):
        return torch.from_numpy(np.ascontiguousarray(read))
    fractions, top = read
    values = torch.from_numpy(np.ascontiguousarray(fractions))
    distinct = torch.unique(values)
    if distinct.numel() == 1 or (distinct.numel() == 2 and distinct[0] == 0):
        return (values > 0).to(torch.uint8)
    if distinct[-1] < MASK_THRESHOLD and distinct.numel() <= MAX_LABELS:
        labels = [round(float(value) * top) for value in distinct[1:]]
        logger.warning(
            "Mask '%s' is a label map with labels %s besides 0: every non-zero label counts as abnormal.",
            name,
            labels,
        )
        return (values > 0).to(torch.uint8)
    logger.warning(
        "Mask '%s' is not binary (%d distinct values from %.4g to %.4g of the full range): pixels at or above "
        "%.2f of the full range count as abnormal.",
        name,
        distinct.numel(),
        float(distinct[0]),
        float(distinct[-1]),
        MASK_THRESHOLD,
    )
    return (values >= MASK_THRESHOLD).to(torch.uint8)


DEFAULT_READER = ScanReader()


def resolve_reader(reader: ScanReader | None) -> ScanReader:
    """``reader``, or the default :class:`ScanReader` when ``None``: what a datamodule's ``reader:`` becomes.

    Raises:
        MvfaInputError: If ``reader`` is something else (settings as a ``dict``: pass ``ScanReader(**settings)``).

    Example:
        >>> resolve_reader(None) == ScanReader()
        True
        >>> resolve_reader(ScanReader(slice_axis="coronal")).slice_axis
        'coronal'
    """
    if reader is None:
        return DEFAULT_READER
    if not isinstance(reader, ScanReader):
        msg = f"reader must be a ScanReader (or None for the default), got {type(reader).__name__}: {reader!r}."
        raise MvfaInputError(msg)
    return reader


def reader_of(datamodule: object) -> ScanReader:
    """The reader of a datamodule of this package, or the default :class:`ScanReader` for any other.

    Example:
        >>> reader_of(None) is DEFAULT_READER
        True
    """
    reader = getattr(datamodule, "reader", None)
    return reader if isinstance(reader, ScanReader) else DEFAULT_READER


def read_image(name: str | Path, reader: ScanReader | None = None) -> torch.Tensor:
    """Read one sample with ``reader`` (the default :class:`ScanReader` when ``None``).

    Example:
        >>> image = read_image("scan.dcm")  # 3 x H x W in [0, 1]  # doctest: +SKIP
    """
    return (reader or DEFAULT_READER).read_image(name)
