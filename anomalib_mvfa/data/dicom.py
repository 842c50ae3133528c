"""DICOM files read with pydicom (the ``[medical]`` extra), one sample per frame.

What happens to the stored values, in the order of the DICOM standard's grey-scale pipeline:

1. Decoding, with the decoders pydicom finds (``[medical]`` installs GDCM, OpenJPEG, RLE and
   JPEG-LS ones); YBR photometric interpretations come out as RGB, palette colour through its LUT.
2. The modality LUT (rescale slope and intercept, or a modality LUT sequence): CT values become
   Hounsfield units.
3. The intensity setting (:mod:`anomalib_mvfa.data.intensity`); under ``"auto"`` this is the
   file's VOI LUT or its first window centre/width (``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``), as
   a viewer shows the image. A user window is in the units of step 2.
4. ``MONOCHROME1`` (white is low) is inverted, so that every image is "high is bright".

Example:
    >>> from anomalib_mvfa.data.dicom import read_dicom
    >>> image = read_dicom("CT_small.dcm")  # H x W x 3 in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MvfaInputError
from .intensity import Intensity, dtype_range, scale_values

DICOM_SUFFIXES = (".dcm", ".dicom")
INSTALL_HINT = "pip install 'anomalib-mvfa[medical]'"
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _pydicom() -> Any:
    try:
        import pydicom  # noqa: PLC0415
    except ImportError as error:
        msg = f"Reading DICOM files needs pydicom: {INSTALL_HINT}."
        raise ImportError(msg) from error
    return pydicom


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble and ``DICM`` marker (files without a suffix)."""
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: str | Path, *, pixels: bool) -> Any:
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except Exception as error:
        msg = f"DICOM '{path}' cannot be read: {error}"
        raise MvfaInputError(msg) from error


def dicom_frame_count(path: str | Path) -> int:
    """Number of frames of a DICOM file; 0 for one without pixel data (a report, a presentation state)."""
    dataset = _read(path, pixels=False)
    if not any(keyword in dataset for keyword in ("Rows", "Columns")) or "BitsAllocated" not in dataset:
        return 0
    return int(dataset.get("NumberOfFrames", 1) or 1)


def dicom_size(path: str | Path) -> tuple[int, int]:
    """``(rows, columns)`` from the header."""
    dataset = _read(path, pixels=False)
    return int(dataset.Rows), int(dataset.Columns)


def _decode(dataset: Any, path: str | Path, frame: int) -> np.ndarray:
    """One frame's stored values; YBR as RGB. Errors name the file and its transfer syntax."""
    pydicom = _pydicom()
    from pydicom.pixels import get_decoder, pixel_array  # noqa: PLC0415

    if not any(keyword in dataset for keyword in PIXEL_KEYWORDS):
        msg = f"DICOM '{path}' holds no pixel data (SOP class {dataset.get('SOPClassUID', 'unknown')!s})."
        raise MvfaInputError(msg)
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    syntax_name = f"'{syntax.name}' ({syntax})" if syntax is not None else "not stated"
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        msg = f"DICOM '{path}' has no frame {frame}: it has {frames}."
        raise MvfaInputError(msg)
    try:
        return pixel_array(dataset, index=frame if frames > 1 else None)
    except NotImplementedError as error:
        msg = (
            f"DICOM '{path}' uses transfer syntax {syntax_name}, for which no pixel data decoder exists "
            f"({error}). Convert it, for example to Explicit VR Little Endian."
        )
        raise MvfaInputError(msg) from error
    except Exception as error:
        missing: list[str] = []
        if syntax is not None:
            try:
                missing = list(get_decoder(syntax).missing_dependencies)
            except (NotImplementedError, ValueError):
                missing = []
        if missing or ("decode" in str(error).lower() and "plugin" in str(error).lower()):
            needs = f" Decoders that are not installed: {missing}." if missing else ""
            first = str(error).splitlines()[0]
            msg = (
                f"DICOM '{path}' uses transfer syntax {syntax_name}, which the installed decoders cannot decode "
                f"({first}).{needs} Install the decoders with {INSTALL_HINT}; 12-bit 'JPEG Extended' data also "
                "needs pylibjpeg-libjpeg (GPL-3.0)."
            )
            raise MvfaInputError(msg) from error
        msg = f"DICOM '{path}' pixel data cannot be decoded ({pydicom.__name__} {pydicom.__version__}): {error}"
        raise MvfaInputError(msg) from error


def read_dicom_stored(path: str | Path, frame: int = 0) -> np.ndarray:
    """One frame's stored values, decoded (a DICOM mask's labels)."""
    return _decode(_read(path, pixels=True), path, frame)


def _stored_range(dataset: Any) -> tuple[float, float]:
    """Range of the stored values (``BitsStored``, signed or not) after the modality rescale."""
    bits = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None and "ModalityLUTSequence" not in dataset:
        low, high = sorted((low * float(slope) + float(intercept), high * float(slope) + float(intercept)))
    return low, high


def _first(value: Any) -> float:
    """The first of several values (window centre or width), or the one value."""
    try:
        return float(value[0])
    except TypeError:  # a single value
        return float(value)


def file_window(dataset: Any) -> Callable[[np.ndarray], np.ndarray] | None:
    """The file's VOI as a map to ``[0, 1]``: its VOI LUT, else its first window; ``None`` without either.

    Windows follow PS3.3 C.11.2.1.2 (``LINEAR``, ``LINEAR_EXACT``, ``SIGMOID``).
    """
    if "VOILUTSequence" in dataset:
        from pydicom.pixels import apply_voi_lut  # noqa: PLC0415

        bits = int(dataset.VOILUTSequence[0].LUTDescriptor[2])
        return lambda values: apply_voi_lut(values, dataset, index=0, prefer_lut=True) / float(2**bits - 1)
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    centre, width = _first(dataset["WindowCenter"].value), _first(dataset["WindowWidth"].value)
    function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return lambda values: 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return lambda values: np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    centre, width = centre - 0.5, width - 1.0
    if width <= 0:
        return None
    return lambda values: np.clip((values - centre) / width + 0.5, 0.0, 1.0)


def read_dicom(path: str | Path, frame: int = 0, intensity: Intensity | None = None) -> np.ndarray:
    """One frame of a DICOM file as ``H x W x 3`` float32 in ``[0, 1]`` (see the module docstring).

    Raises:
        ValueError: If the file has no pixel data, cannot be decoded with what is installed (the
            message names the transfer syntax and the decoders to install) or has no such frame.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut  # noqa: PLC0415

    dataset = _read(path, pixels=True)
    stored = _decode(dataset, path, frame)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    intensity = intensity or Intensity()
    palette = photometric == "PALETTE COLOR"
    if palette:
        stored = apply_color_lut(stored, dataset)
        photometric = "RGB"
    if photometric.startswith("MONOCHROME"):
        values = apply_modality_lut(stored, dataset)
        unit = scale_values(
            np.asarray(values),
            intensity,
            type_range=_stored_range(dataset),
            # every DICOM states its bits; "auto" shows it as a viewer does (window, else percentiles)
            declared_range=_stored_range(dataset) if intensity.mode == "bits" else None,
            file_window=file_window(dataset),
            eight_bit=int(dataset.get("BitsStored", 16)) <= 8 and "RescaleSlope" not in dataset,
        )
        if photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return np.repeat(unit[..., None], 3, axis=-1)
    # a palette's colours have the LUT's depth, not the stored indices' BitsStored
    bits = stored.dtype.itemsize * 8 if palette else int(dataset.get("BitsStored", stored.dtype.itemsize * 8))
    colour = stored if stored.ndim == 3 else np.repeat(stored[..., None], 3, axis=-1)
    return scale_values(
        colour[..., :3],
        intensity,
        type_range=dtype_range(stored.dtype),
        declared_range=(0.0, float(2**bits - 1)),
        eight_bit=stored.dtype.itemsize == 1,
    )
