"""NIfTI volumes read with nibabel (the ``[medical]`` extra): 2D slices in, volumes of maps out.

A volume is turned to nibabel's closest canonical orientation (RAS+) and cut along one axis
(``"axial"``, ``"coronal"`` or ``"sagittal"``); a 4D volume gives the slices of one time point.
Each slice is shown with the superior (axial: anterior) side up, as
``canonical[..., index].T[::-1]`` for the axial axis. Values are nibabel's scaled data
(``get_fdata``); under ``intensity="auto"`` the header's ``cal_min``/``cal_max`` display range is
the window where it is set, otherwise the 0.5th to 99.5th percentile of the whole volume, so that
every slice of a volume is scaled alike.

A volume whose time point, decoded to float32, is within the reader's ``max_decoded_bytes`` is
decoded whole and cached; a larger one is streamed: each slice is read through nibabel's array
proxy (a ``.nii.gz`` is inflated as a stream, never whole), its percentiles are those of evenly
spaced stored slices holding at most a quarter of the budget, and only its largest slice must fit
the budget.

:func:`write_volume` puts per-slice maps back into a volume of the source's shape, orientation,
affine and header, written atomically, to be opened over the scan in 3D Slicer or ITK-SNAP.

Example:
    >>> from anomalib_mvfa.data.nifti import read_nifti_slice
    >>> image = read_nifti_slice("brain.nii.gz", "axial", 80)  # H x W x 3 in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MvfaInputError, medical_extra
from .budget import check_budget, check_held, default_max_decoded_bytes
from .intensity import Intensity, dtype_range, percentile_range, scale_values

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
# How many decoded volumes each process (data-loading worker) keeps
CACHED_VOLUMES = 2


def _nibabel() -> Any:
    return medical_extra("nibabel", "Reading NIfTI files")


def is_nifti(path: str | Path) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (any letter case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _load(path: str | Path, **options: Any) -> Any:
    nibabel = _nibabel()
    try:
        return nibabel.load(path, **options)
    except Exception as error:
        msg = f"NIfTI '{path}' cannot be read: {error}"
        raise MvfaInputError(msg) from error


def check_layout(path: str | Path, time_point: int = 0, max_decoded_bytes: int | None = None) -> tuple[int, ...]:
    """Check what the header declares before anything is read; the volume's shape.

    Complex values are refused (a slice of them has no one grey value); an uncompressed file must
    hold the bytes its dimensions and data type declare; one time point (what a read decodes)
    decoded to float32 must be within ``max_decoded_bytes`` (:mod:`~anomalib_mvfa.data.budget`).

    Raises:
        MvfaInputError: Naming the file and what it declares.
    """
    image = _load(path)
    shape = tuple(int(size) for size in image.shape)
    _check_time_point(path, shape, time_point)
    offset = getattr(image.dataobj, "offset", None)  # where the data starts in the file
    if offset is None or not hasattr(image.header, "get_data_dtype"):
        msg = f"NIfTI '{path}' is read by nibabel as a {type(image).__name__}: expected a NIfTI-1 or NIfTI-2 volume."
        raise MvfaInputError(msg)
    dtype = image.header.get_data_dtype()
    if dtype.kind == "c":
        msg = (
            f"NIfTI '{path}' stores complex values ({dtype.name}): expected real values. Save the magnitude "
            "(numpy.abs) or the phase (numpy.angle) as a volume of real numbers."
        )
        raise MvfaInputError(msg)
    layout = f"{' x '.join(str(size) for size in shape)} voxels of {dtype.name}"
    if not str(path).lower().endswith(".gz"):  # nibabel tells compression by the name too
        held = max(Path(path).stat().st_size - int(offset), 0)
        check_held(path, "NIfTI", layout, int(np.prod(shape, dtype=object)) * dtype.itemsize, held)
    # a volume over the budget is streamed a slice at a time (module docstring): its largest slice must fit
    _, *plane = sorted((*shape[:3], 1)[:3])
    decoded = f"{plane[0]} x {plane[1]} voxels x {_decoded_itemsize(dtype)} bytes (its largest slice, decoded)"
    check_budget(path, "NIfTI", decoded, plane[0] * plane[1] * _decoded_itemsize(dtype), max_decoded_bytes)
    return shape


def _decoded_itemsize(dtype: np.dtype) -> int:
    """Bytes a voxel takes once read: float32, or the stored type where it is wider."""
    return max(dtype.itemsize, np.dtype(np.float32).itemsize)


def is_streamed(path: str | Path, time_point: int = 0, max_decoded_bytes: int | None = None) -> bool:
    """Whether one time point of the volume, decoded, is over ``max_decoded_bytes`` (read a slice at a time).

    Example:
        >>> is_streamed("brain.nii.gz", max_decoded_bytes=2**40)  # doctest: +SKIP
        False
    """
    shape = check_layout(path, time_point, max_decoded_bytes)
    size = int(np.prod(shape[:3], dtype=object)) * _decoded_itemsize(_load(path).header.get_data_dtype())
    return size > (default_max_decoded_bytes() if max_decoded_bytes is None else max_decoded_bytes)


def _check_time_point(path: str | Path, shape: tuple[int, ...], time_point: int) -> None:
    if len(shape) < 2 or len(shape) > 4 or (len(shape) == 4 and not 0 <= time_point < shape[3]):
        if len(shape) == 4:
            msg = f"NIfTI '{path}' has {shape[3]} time points; time_point={time_point} is not one of them."
        else:
            msg = f"NIfTI '{path}' has shape {shape}: expected a 2D, 3D or 4D volume."
        raise MvfaInputError(msg)


def _orientation(image: Any) -> np.ndarray:
    """Nibabel orientation of the array axes relative to RAS+."""
    from nibabel.orientations import io_orientation  # noqa: PLC0415

    return io_orientation(image.affine)


def canonical_shape(path: str | Path, time_point: int = 0) -> tuple[int, int, int]:
    """Shape of the volume (one time point) in canonical orientation, from the header."""
    image = _load(path)
    shape = tuple(int(size) for size in image.shape)
    _check_time_point(path, shape, time_point)
    spatial = (*shape[:3], 1, 1)[:3]
    order = _orientation(image)[:, 0]
    canonical = [0, 0, 0]
    for axis, target in enumerate(order):
        canonical[int(target)] = spatial[axis]
    return canonical[0], canonical[1], canonical[2]


def slice_count(path: str | Path, axis: str, time_point: int = 0, max_decoded_bytes: int | None = None) -> int:
    """Number of slices along ``axis`` (``"axial"``, ``"coronal"``, ``"sagittal"``), after :func:`check_layout`."""
    check_layout(path, time_point, max_decoded_bytes)
    return canonical_shape(path, time_point)[SLICE_AXES[axis]]


@lru_cache(maxsize=CACHED_VOLUMES)
def _canonical_volume(path: str, time_point: int, modified: int) -> tuple[np.ndarray, Any]:
    """The scaled float32 volume of one time point in canonical orientation, and its header."""
    from nibabel.orientations import apply_orientation  # noqa: PLC0415

    del modified  # part of the cache key only: a rewritten file is read again
    image = _load(path)
    _check_time_point(path, tuple(image.shape), time_point)
    proxy = image.dataobj
    data = np.asarray(proxy[..., time_point] if len(image.shape) == 4 else proxy[...], dtype=np.float32)
    while data.ndim < 3:
        data = data[..., None]
    return np.ascontiguousarray(apply_orientation(data, _orientation(image))), _scaled_header(image)


def _scaled_header(image: Any) -> Any:
    """The image's header with the scaling nibabel moved into the data proxy on load put back."""
    header = image.header.copy()
    header.set_slope_inter(getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0))
    return header


def _stored_slices(image: Any, time_point: int) -> Iterator[np.ndarray]:
    """The volume's stored slices along its last spatial axis, in file order, as float32 (one read each)."""
    for index in range(image.shape[2]):
        yield _stored_slice(image, time_point, 2, index)


def _stored_slice(image: Any, time_point: int, stored_axis: int, index: int) -> np.ndarray:
    """Slice ``index`` along stored axis ``stored_axis``, read through the array proxy as float32."""
    slicer: list[Any] = [slice(None)] * len(image.shape)
    slicer[stored_axis] = index
    if len(image.shape) == 4:
        slicer[3] = time_point
    return np.asarray(image.dataobj[tuple(slicer)], dtype=np.float32)


def _streamed_plane(path: str | Path, axis: str, index: int, time_point: int) -> tuple[np.ndarray, Any]:
    """What ``np.take(canonical volume, index, axis)`` gives, read as one stored slice; the scaled header."""
    image = _load(path)
    orientation = _orientation(image)  # per stored axis: its canonical axis, and -1 where it runs backwards
    stored = int(np.flatnonzero(orientation[:, 0] == SLICE_AXES[axis])[0])
    size = int(image.shape[stored])
    plane = _stored_slice(image, time_point, stored, index if orientation[stored, 1] > 0 else size - 1 - index)
    rest = [number for number in range(3) if number != stored]
    for position, number in enumerate(rest):
        if orientation[number, 1] < 0:
            plane = np.flip(plane, axis=position)
    if orientation[rest[0], 0] > orientation[rest[1], 0]:
        plane = plane.T
    return np.ascontiguousarray(plane), _scaled_header(image)


def _canonical_plane(
    path: str | Path, axis: str, index: int, time_point: int, max_decoded_bytes: int | None
) -> tuple[np.ndarray, Any]:
    """Canonical slice ``index`` along ``axis`` (before :func:`to_display`), cached or streamed; the header."""
    if is_streamed(path, time_point, max_decoded_bytes):
        count = canonical_shape(path, time_point)[SLICE_AXES[axis]]
        _check_index(path, axis, index, count)
        return _streamed_plane(path, axis, index, time_point)
    volume, header = canonical_volume(path, time_point, max_decoded_bytes)
    _check_index(path, axis, index, volume.shape[SLICE_AXES[axis]])
    return np.take(volume, index, axis=SLICE_AXES[axis]), header


def _check_index(path: str | Path, axis: str, index: int, count: int) -> None:
    if not 0 <= index < count:
        msg = f"NIfTI '{path}' has {count} {axis} slices; slice {index} is not one of them."
        raise MvfaInputError(msg)


def canonical_volume(
    path: str | Path, time_point: int = 0, max_decoded_bytes: int | None = None
) -> tuple[np.ndarray, Any]:
    """Cached :func:`_canonical_volume` (the last :data:`CACHED_VOLUMES` volumes of this process).

    The header is checked first (:func:`check_layout`), so nothing is read from a file that lies.
    """
    check_layout(path, time_point, max_decoded_bytes)
    return _canonical_volume(str(path), time_point, Path(path).stat().st_mtime_ns)


@lru_cache(maxsize=CACHED_VOLUMES)
def _volume_percentiles(
    path: str, time_point: int, modified: int, percentiles: tuple[float, float], budget: int
) -> tuple[float, float]:
    """Percentiles of the whole volume, or of a streamed volume's evenly spaced stored slices (module docstring)."""
    if not is_streamed(path, time_point, budget):
        volume, _ = _canonical_volume(path, time_point, modified)
        return percentile_range(volume, percentiles)
    image = _load(path, keep_file_open=True)  # the slices are read in file order, a .nii.gz inflated once
    count = int(image.shape[2])
    slice_bytes = int(image.shape[0]) * int(image.shape[1]) * np.dtype(np.float32).itemsize
    kept = set(np.linspace(0, count - 1, max(1, min(count, budget // 4 // slice_bytes))).round().astype(int).tolist())
    sample = [values.ravel() for index, values in enumerate(_stored_slices(image, time_point)) if index in kept]
    return percentile_range(np.concatenate(sample), percentiles)


def to_display(plane: np.ndarray) -> np.ndarray:
    """A canonical plane (first axis left to right) as an image with the upper side up."""
    return plane.T[::-1]


def from_display(image: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`."""
    return image[::-1].T


def _file_window(header: Any) -> tuple[float, float] | None:
    low, high = float(header.get("cal_min", 0) or 0), float(header.get("cal_max", 0) or 0)
    return (low, high) if high > low else None


def read_nifti_slice(
    path: str | Path,
    axis: str,
    index: int,
    intensity: Intensity | None = None,
    time_point: int = 0,
    max_decoded_bytes: int | None = None,
) -> np.ndarray:
    """One slice of a NIfTI volume as ``H x W x 3`` float32 in ``[0, 1]`` (see the module docstring).

    Raises:
        ValueError: If the file cannot be read, the time point or slice does not exist.
    """
    intensity = intensity or Intensity()
    plane, header = _canonical_plane(path, axis, index, time_point, max_decoded_bytes)
    plane = to_display(plane)
    stats = None
    if intensity.mode in {"auto", "percentile"}:
        budget = default_max_decoded_bytes() if max_decoded_bytes is None else max_decoded_bytes
        modified = Path(path).stat().st_mtime_ns
        stats = _volume_percentiles(str(path), time_point, modified, intensity.percentiles, budget)
    window = _file_window(header)
    stored = header.get_data_dtype()
    slope, intercept = header.get_slope_inter()
    slope, intercept = (1.0 if slope is None else float(slope)), (0.0 if intercept is None else float(intercept))
    scaled = slope != 1.0 or intercept != 0.0
    low, high = (0.0, 1.0) if stored.kind == "f" else dtype_range(stored)
    unit = scale_values(
        plane,
        intensity,
        type_range=tuple(sorted((low * slope + intercept, high * slope + intercept))),  # the stored type, scaled
        file_window=(lambda values: (values - window[0]) / (window[1] - window[0])) if window else None,
        stats_range=stats,
        eight_bit=stored.itemsize == 1 and not scaled,
    )
    return np.repeat(unit[..., None], 3, axis=-1)


def read_nifti_mask_slice(
    path: str | Path, axis: str, index: int, time_point: int = 0, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """One slice of a label volume as ``H x W`` uint8: every non-zero label is 1."""
    plane, _ = _canonical_plane(path, axis, index, time_point, max_decoded_bytes)
    return (to_display(plane) != 0).astype(np.uint8)


def empty_slices(path: str | Path, axis: str, time_point: int = 0, max_decoded_bytes: int | None = None) -> list[int]:
    """Slices in which every voxel holds the volume's smallest value (no tissue, only background)."""
    return np.flatnonzero(~_slices_holding_other_than(path, axis, time_point, max_decoded_bytes, None)).tolist()


def marked_slices(path: str | Path, axis: str, time_point: int = 0, max_decoded_bytes: int | None = None) -> np.ndarray:
    """Per slice along ``axis`` of a label volume: whether it holds a non-zero voxel.

    Example:
        >>> marked_slices("labels.nii.gz", "axial")  # doctest: +SKIP
        array([False,  True,  True, False])
    """
    return _slices_holding_other_than(path, axis, time_point, max_decoded_bytes, 0.0)


def _slices_holding_other_than(
    path: str | Path, axis: str, time_point: int, max_decoded_bytes: int | None, value: float | None
) -> np.ndarray:
    """Per canonical slice along ``axis``: whether a voxel differs from ``value`` (``None``: the smallest)."""
    target = SLICE_AXES[axis]
    if not is_streamed(path, time_point, max_decoded_bytes):
        volume, _ = canonical_volume(path, time_point, max_decoded_bytes)
        value = volume.min() if value is None else value
        return (volume != value).any(axis=tuple(dim for dim in range(3) if dim != target))
    image = _load(path, keep_file_open=True)  # stored slices read in file order, a .nii.gz inflated once per pass
    if value is None:
        value = min(values.min() for values in _stored_slices(image, time_point))
    orientation = _orientation(image)
    stored = int(np.flatnonzero(orientation[:, 0] == target)[0])
    if stored == 2:
        holding = np.array([(values != value).any() for values in _stored_slices(image, time_point)])
    else:
        holding = np.zeros(int(image.shape[stored]), dtype=bool)
        for values in _stored_slices(image, time_point):
            holding |= (values != value).any(axis=1 - stored)
    return holding if orientation[stored, 1] > 0 else holding[::-1]


def check_label_volume(image_path: str | Path, mask_path: str | Path) -> None:
    """A label volume must have the shape and affine of its image volume.

    Raises:
        ValueError: Naming both files and what differs.
    """
    image, mask = _load(image_path), _load(mask_path)
    if tuple(image.shape[:3]) != tuple(mask.shape[:3]):
        msg = (
            f"Label volume '{mask_path}' has shape {tuple(mask.shape)} but its image volume '{image_path}' has "
            f"{tuple(image.shape)}: a mask must have the image's grid."
        )
        raise MvfaInputError(msg)
    if not np.allclose(image.affine, mask.affine, atol=1e-3):
        msg = (
            f"Label volume '{mask_path}' has another affine than its image volume '{image_path}':\n"
            f"{np.round(mask.affine, 4)}\nagainst\n{np.round(image.affine, 4)}"
        )
        raise MvfaInputError(msg)


def write_volume(
    slices: dict[int, np.ndarray],
    source: str | Path,
    destination: str | Path,
    axis: str,
    time_point: int = 0,
    dtype: np.dtype | type = np.float32,
) -> Path:
    """Write per-slice images (:func:`to_display` orientation) as a volume over ``source``.

    Slices not given are 0. The volume has the source's 3D grid, voxel order, affine and header
    (its data type set to ``dtype``, its scaling and display range reset). The file is written next
    to ``destination`` under a temporary name and moved into place, so it is whole or absent.

    Raises:
        ValueError: If a slice has another size than the source's slices.
    """
    from nibabel.orientations import apply_orientation, ornt_transform  # noqa: PLC0415

    nibabel = _nibabel()
    image = _load(source)
    shape = canonical_shape(source, time_point)
    volume = np.zeros(shape, dtype=np.dtype(dtype))
    dim = SLICE_AXES[axis]
    for index, plane in slices.items():
        canonical_plane = from_display(np.asarray(plane))
        expected = tuple(size for number, size in enumerate(shape) if number != dim)
        if canonical_plane.shape != expected:
            msg = f"Slice {index} is {np.asarray(plane).shape[:2]} pixels; the {axis} slices of '{source}' are " + (
                f"{to_display(np.zeros(expected)).shape}."
            )
            raise MvfaInputError(msg)
        index_tuple = [slice(None)] * 3
        index_tuple[dim] = index
        volume[tuple(index_tuple)] = canonical_plane
    orientation = _orientation(image)
    back = ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), orientation)
    data = apply_orientation(volume, back)
    data = data.reshape(tuple(int(size) for size in image.shape[:3]))
    header = image.header.copy()
    header.set_data_dtype(np.dtype(dtype))
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0
    result = type(image)(data, image.affine, header)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if destination.name.lower().endswith(".gz") else ".nii"
    temporary = destination.with_name(f".{destination.name}.{os.getpid()}.partial{suffix}")
    try:
        nibabel.save(result, temporary)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    return destination
