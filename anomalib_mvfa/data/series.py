"""DICOM series as volumes: single-frame files grouped by ``SeriesInstanceUID``, in anatomical order.

A CT or MR series is stored as one file per slice. :func:`series_identities` reads the headers
(never the pixel data) of the DICOM files of a folder, groups the single-frame files by
``SeriesInstanceUID``, checks that the files of each series agree in size, orientation and pixel
spacing (a series that mixes them is refused, naming its UID and the files), and orders each series
by ``ImagePositionPatient`` projected on the slice normal (the cross product of the two direction
cosines of ``ImageOrientationPatient``). Where positions are missing, repeated or unevenly spaced (a
missing file), the series is ordered by ``InstanceNumber`` instead, with a warning naming it.

Every file then has a *study*, the volume it belongs to (the series UID), and a *slice*, its index
in anatomical order; a multi-frame file is a volume of its own frames, with its series UID as study.
Files outside any series (2D images, DICOM files without a series UID) are studies of their own, and
so are projection images (radiographs: a series none of whose files states a position or an
orientation is no volume).

Example:
    >>> from anomalib_mvfa.data.series import series_identities
    >>> identities = series_identities(sorted(Path("ct").glob("*.dcm")))  # doctest: +SKIP
    >>> identities[Path("ct/IM0007.dcm")]  # doctest: +SKIP
    Identity(study='1.2.826.0.1.3680043.8.498.1', slice=6)
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import MvfaInputError
from . import dicom
from .formats import file_format

logger = logging.getLogger(__name__)

# Positions closer than this along the normal (mm) are the same position
SAME_POSITION_MM = 1e-3
# Gaps between slices may differ from their median by this share before a series counts as unevenly spaced
SPACING_TOLERANCE = 0.01
# Decimals to which orientations and spacings are compared across the files of a series
COMPARED_DECIMALS = 4
# Files named in an error, at most
LISTED_FILES = 5


class Identity(NamedTuple):
    """The volume a sample belongs to (``study``) and its index in that volume (``slice``)."""

    study: str
    slice: int


@dataclass(frozen=True)
class SliceHeader:
    """What grouping needs of one DICOM file's header."""

    path: Path
    series_uid: str | None
    sop_uid: str | None
    frames: int
    size: tuple[int, int] | None
    orientation: tuple[float, ...] | None
    position: tuple[float, float, float] | None
    spacing: tuple[float, float] | None
    instance: int | None


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(item) for item in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


def read_slice_header(path: str | Path, max_decoded_bytes: int | None = None) -> SliceHeader:
    """The header of one DICOM file (read with ``stop_before_pixels``).

    Raises:
        MvfaInputError: If it cannot be read, naming it.
    """
    dataset = dicom.read_header(path, max_decoded_bytes)
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        instance = int(dataset.InstanceNumber) if dataset.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        instance = None
    size = (int(dataset.Rows), int(dataset.Columns)) if "Rows" in dataset and "Columns" in dataset else None
    uid = str(dataset.get("SeriesInstanceUID", "") or "").strip() or None
    return SliceHeader(
        path=Path(path),
        series_uid=uid,
        sop_uid=str(dataset.get("SOPInstanceUID", "") or "") or None,
        frames=frames,
        size=size,
        orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
        position=_floats(dataset.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        spacing=_floats(dataset.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        instance=instance,
    )


def _named(files: Sequence[Path]) -> str:
    names = [str(path) for path in files[:LISTED_FILES]]
    return ", ".join(names) + (f" and {len(files) - LISTED_FILES} more" if len(files) > LISTED_FILES else "")


def check_consistent(uid: str, headers: Sequence[SliceHeader]) -> None:
    """Refuse a series whose files disagree in size, orientation or pixel spacing, naming its UID and files.

    Raises:
        MvfaInputError: Naming the series, the attribute and the files of each value.
    """

    def rounded(value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if value is None else tuple(round(item, COMPARED_DECIMALS) + 0.0 for item in value)

    checks = (
        ("size (rows, columns)", lambda header: header.size),
        ("ImageOrientationPatient", lambda header: rounded(header.orientation)),
        ("PixelSpacing", lambda header: rounded(header.spacing)),
    )
    for label, value_of in checks:
        groups: dict[Any, list[Path]] = defaultdict(list)
        for header in headers:
            groups[value_of(header)].append(header.path)
        if len(groups) > 1:
            listed = "; ".join(f"{value} in {_named(files)}" for value, files in groups.items())
            msg = (
                f"DICOM series '{uid}' mixes files of different {label}: {listed}. The files of a series must "
                "share size, orientation and pixel spacing to be one volume: move the odd files to another "
                "folder, or read every file as an image of its own with --data.reader.group_series false."
            )
            raise MvfaInputError(msg)


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal: cross product of the row and column direction cosines of ``ImageOrientationPatient``.

    Example:
        >>> slice_normal([1, 0, 0, 0, 1, 0]).tolist()
        [0.0, 0.0, 1.0]
    """
    values = np.asarray(orientation, dtype=np.float64)
    return np.cross(values[:3], values[3:])


def _position_problem(headers: Sequence[SliceHeader]) -> tuple[list[SliceHeader] | None, str]:
    """The headers in order along the normal, or ``None`` and why positions cannot order them."""
    lacking = [header.path for header in headers if header.position is None or header.orientation is None]
    if lacking:
        return None, f"{len(lacking)} file(s) lack ImagePositionPatient or ImageOrientationPatient ({_named(lacking)})"
    normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
    distance = {header.path: float(np.dot(header.position, normal)) for header in headers}  # type: ignore[arg-type]
    ordered = sorted(headers, key=lambda header: distance[header.path])
    gaps = np.diff([distance[header.path] for header in ordered])
    if len(gaps) and gaps.min() < SAME_POSITION_MM:
        first = int(np.argmin(gaps))
        pair = [ordered[first].path, ordered[first + 1].path]
        return None, f"files share a position along the slice normal ({_named(pair)})"
    if len(gaps) > 1:
        median = float(np.median(gaps))
        if np.abs(gaps - median).max() > SPACING_TOLERANCE * median:
            return None, (
                f"slices are unevenly spaced (gaps from {gaps.min():.3g} to {gaps.max():.3g} mm along the slice "
                "normal: a file missing?)"
            )
    return ordered, ""


def order_series(uid: str, headers: Sequence[SliceHeader]) -> list[SliceHeader]:
    """The files of one series in anatomical order (module docstring); warns, naming the series, on a fallback."""
    ordered, problem = _position_problem(headers)
    if ordered is not None or len(headers) == 1:
        return ordered or list(headers)
    folder = headers[0].path.parent
    numbers = [header.instance for header in headers]
    if None not in numbers and len(set(numbers)) == len(numbers):
        logger.warning("DICOM series '%s' in '%s': %s; ordered by InstanceNumber.", uid, folder, problem)
        return sorted(headers, key=lambda header: header.instance)  # type: ignore[arg-type, return-value]
    logger.warning(
        "DICOM series '%s' in '%s': %s, and InstanceNumber is missing or repeated; ordered by file name.",
        uid,
        folder,
        problem,
    )
    return sorted(headers, key=lambda header: header.path.name)


def group_series(headers: Iterable[SliceHeader]) -> dict[str, list[SliceHeader]]:
    """Single-frame files with a series UID, by UID, each series checked and in anatomical order."""
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        if header.series_uid is not None and header.frames == 1 and header.size is not None:
            groups[header.series_uid].append(header)
    series = {}
    for uid, members in groups.items():
        if all(header.position is None and header.orientation is None for header in members):
            continue  # projection images (radiographs): no geometry, no volume
        check_consistent(uid, members)
        series[uid] = order_series(uid, members)
    return series


def dicom_headers(files: Iterable[str | Path], max_decoded_bytes: int | None = None) -> list[SliceHeader]:
    """Headers of the DICOM files among ``files``; files that cannot be read are left to the checks before a run."""
    headers = []
    for path in files:
        if file_format(path) != "dicom":
            continue
        try:
            headers.append(read_slice_header(path, max_decoded_bytes))
        except MvfaInputError:
            continue
    return headers


def series_identities(files: Iterable[str | Path], max_decoded_bytes: int | None = None) -> dict[Path, Identity]:
    """The study and slice of every DICOM file of ``files`` that belongs to a series (module docstring).

    Single-frame files get their series UID and their index in anatomical order; a multi-frame file
    gets its series UID (or, when other files share that UID, the UID and its file name) and slice 0,
    its frames being numbered by the reader. Files without a series UID are left out: each is a study
    of its own.

    Raises:
        MvfaInputError: If a series mixes sizes, orientations or pixel spacings (:func:`check_consistent`).
    """
    headers = dicom_headers(files, max_decoded_bytes)
    identities: dict[Path, Identity] = {}
    for uid, ordered in group_series(headers).items():
        for index, header in enumerate(ordered):
            identities[header.path] = Identity(uid, index)
    multi_frame = [header for header in headers if header.frames > 1 and header.series_uid is not None]
    counts = Counter(header.series_uid for header in multi_frame)
    taken = {identity.study for identity in identities.values()}
    for header in multi_frame:
        uid = header.series_uid
        shared = counts[uid] > 1 or uid in taken
        identities[header.path] = Identity(f"{uid}/{header.path.name}" if shared else uid, 0)  # type: ignore[arg-type]
    return identities
