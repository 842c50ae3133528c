"""Mapping stored pixel values to the ``[0, 1]`` range the model reads.

Four ways, chosen with :class:`Intensity`:

- ``"range"``: the full range of the stored type (8-bit / 255, unsigned 16-bit / 65535, signed
  16-bit from -32768 to 32767); floating-point data is clipped to ``[0, 1]``.
- ``"bits"``: the file's own significant bits where its format states them (PNG ``sBIT``, TIFF
  ``MaxSampleValue``/``SMaxSampleValue``, DICOM ``BitsStored`` through the rescale), otherwise the
  type range.
- ``"window"``: a fixed window ``(centre, width)`` in the file's units (Hounsfield units for CT
  DICOM, stored values for PNG/TIFF, scaled data for NIfTI): ``centre - width / 2`` maps to 0,
  ``centre + width / 2`` to 1.
- ``"percentile"``: per image (per volume for NIfTI), the ``percentiles`` of its values map to 0 and 1.

``"auto"`` (the default) shows an image the way a viewer does: through the file's own window where
it has one (DICOM window or VOI LUT, NIfTI ``cal_min``/``cal_max``); otherwise 8-bit data as stored
(the benchmark's PNGs), and data of more than 8 bits through its significant bits where the format
states them, else the 0.5th to 99.5th percentile of the image (or volume).

Example:
    >>> import numpy as np
    >>> from anomalib_mvfa.data.intensity import Intensity, scale_values
    >>> values = np.array([[0.0, 40.0, 80.0]])
    >>> scale_values(values, Intensity("window", window=(40, 80)), type_range=(0, 65535)).tolist()
    [[0.0, 0.5, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import MvfaInputError

INTENSITY_MODES = ("auto", "range", "bits", "window", "percentile")


@dataclass(frozen=True)
class Intensity:
    """How stored values become ``[0, 1]`` (see the module docstring).

    Args:
        mode: One of :data:`INTENSITY_MODES`.
        window: ``(centre, width)`` of ``"window"``; giving it with ``mode="auto"`` selects ``"window"``.
        percentiles: Low and high percentile of ``"percentile"`` (and of ``"auto"`` without a file window).

    Example:
        >>> Intensity("window", window=(40, 80))  # a brain CT window in Hounsfield units
        Intensity(mode='window', window=(40.0, 80.0), percentiles=(0.5, 99.5))
    """

    mode: str = "auto"
    window: tuple[float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        """Validate the settings, naming the bad one."""
        if self.mode not in INTENSITY_MODES:
            msg = f"intensity must be one of {INTENSITY_MODES}, got {self.mode!r}."
            raise MvfaInputError(msg)
        if self.window is not None:
            if len(self.window) != 2 or not float(self.window[1]) > 0:
                msg = f"window must be (centre, width) with a positive width, got {self.window!r}."
                raise MvfaInputError(msg)
            object.__setattr__(self, "window", (float(self.window[0]), float(self.window[1])))
            if self.mode == "auto":
                object.__setattr__(self, "mode", "window")
        if self.mode == "window" and self.window is None:
            msg = "intensity='window' needs window=(centre, width), for example (40, 80) for a brain CT."
            raise MvfaInputError(msg)
        low, high = (float(value) for value in self.percentiles)
        if not 0 <= low < high <= 100:
            msg = f"percentiles must be (low, high) with 0 <= low < high <= 100, got {self.percentiles!r}."
            raise MvfaInputError(msg)
        object.__setattr__(self, "percentiles", (low, high))


def dtype_range(dtype: np.dtype) -> tuple[float, float]:
    """Smallest and largest value of an integer type; ``(0, 1)`` for floating point and booleans."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return float(info.min), float(info.max)
    return 0.0, 1.0


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``low`` to 0, ``high`` to 1, clipped; a constant image (``high <= low``) becomes 0."""
    if not high > low:
        return np.zeros(values.shape, dtype=np.float32)
    if values.dtype != np.float64:  # the caller's own float32 copy: changed in place
        values -= np.float32(low)
        values /= np.float32(high - low)
        return np.clip(values, 0.0, 1.0, out=values)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def percentile_range(values: np.ndarray, percentiles: tuple[float, float]) -> tuple[float, float]:
    """The two percentiles of the finite values (``(0, 0)`` when there is none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    low, high = np.percentile(finite, percentiles)
    return float(low), float(high)


def scale_values(
    values: np.ndarray,
    intensity: Intensity,
    *,
    type_range: tuple[float, float],
    declared_range: tuple[float, float] | None = None,
    file_window: Callable[[np.ndarray], np.ndarray] | None = None,
    stats_range: tuple[float, float] | None = None,
    eight_bit: bool = False,
) -> np.ndarray:
    """Map ``values`` to float32 in ``[0, 1]`` as ``intensity`` says.

    Args:
        values: Stored values (after the modality rescale for DICOM, the scaling for NIfTI).
        intensity: The setting.
        type_range: Range of the stored type (``"range"``).
        declared_range: Range the file states through its significant bits (``"bits"``).
        file_window: The file's own window or VOI LUT, mapping values to ``[0, 1]`` (``"auto"``).
        stats_range: The percentiles of the whole volume, for readers of one slice of it;
            ``None`` computes them from ``values``.
        eight_bit: The data has at most 8 bits (``"auto"`` then keeps the type range).

    Returns:
        float32 array of the shape of ``values``; NaN becomes 0.
    """
    # a copy this function owns, changed in place: float32 holds 8- and 16-bit values exactly, wider types need float64
    exact_in_float32 = values.dtype.itemsize <= 2 or values.dtype == np.float32
    values = values.astype(np.float32 if exact_in_float32 else np.float64)
    np.nan_to_num(values, copy=False, nan=0.0, posinf=np.inf, neginf=-np.inf)
    mode = intensity.mode
    if mode == "auto":
        if file_window is not None:
            return np.clip(file_window(values), 0.0, 1.0).astype(np.float32)
        mode = "range" if eight_bit else "bits" if declared_range is not None else "percentile"
    if mode == "window":
        centre, width = intensity.window  # type: ignore[misc]
        return _stretch(values, centre - width / 2, centre + width / 2)
    if mode == "percentile":
        return _stretch(values, *(stats_range or percentile_range(values, intensity.percentiles)))
    if mode == "bits" and declared_range is not None:
        return _stretch(values, *declared_range)
    return _stretch(values, *type_range)
