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

import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MEDICAL_INSTALL_HINT, MvfaInputError, medical_extra
from .budget import check_budget, check_held, default_max_decoded_bytes, human_bytes
from .intensity import Intensity, dtype_range, scale_values

DICOM_SUFFIXES = (".dcm", ".dicom")
INSTALL_HINT = MEDICAL_INSTALL_HINT
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Values larger than this are not read with the header: the pixel data's length is known without reading it
DEFER_BYTES = 1024
# A deflated file: the preamble and "DICM", then the group length element (tag, VR, length, value), then the meta
DICOM_PREAMBLE_BYTES, META_GROUP_LENGTH_BYTES = 132, 12
# Inflated bytes read at a time, and allowed beside the pixel data (the other elements) of a deflated data set
INFLATE_CHUNK_BYTES, DEFLATED_HEADER_BYTES = 2**20, 2**24
# RLE (PS3.5 G.3.1) repeats a byte at most 128 times for 2 bytes of data: no segment decodes to more than 64 x its size
RLE_MOST_EXPANSION = 64
# Bits per LUT entry a VOI LUT may declare (PS3.3 C.11.2.1.1)
VOI_LUT_BITS = (8, 16)


def _pydicom() -> Any:
    return medical_extra("pydicom", "Reading DICOM files")


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble and ``DICM`` marker (files without a suffix)."""
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def _read(path: str | Path, *, pixels: bool, defer: bool = False, max_decoded_bytes: int | None = None) -> Any:
    """The data set as pydicom reads it; a deflated one measured against the budget first (:func:`_check_inflated`)."""
    pydicom = _pydicom()
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception as error:
        msg = f"DICOM '{path}' cannot be read: {error}"
        raise MvfaInputError(msg) from error
    if meta.get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
        _check_inflated(path, meta, max_decoded_bytes)
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels, defer_size=DEFER_BYTES if defer else None)
    except Exception as error:
        msg = f"DICOM '{path}' cannot be read: {error}"
        raise MvfaInputError(msg) from error


def _check_inflated(path: str | Path, meta: Any, max_decoded_bytes: int | None) -> None:
    """Inflate a deflated data set a chunk at a time, keeping nothing, and refuse it once it passes the budget.

    pydicom inflates the whole data set after the file meta information at once, before any element
    can be checked, so a few kilobytes could become gigabytes; the budget (plus
    :data:`DEFLATED_HEADER_BYTES` for the elements other than the pixel data) bounds it first.
    """
    length = meta.get("FileMetaInformationGroupLength")
    if length is None:
        msg = f"DICOM '{path}' is deflated but has no FileMetaInformationGroupLength: its data set cannot be found."
        raise MvfaInputError(msg)
    budget = default_max_decoded_bytes() if max_decoded_bytes is None else max_decoded_bytes
    inflater, inflated, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, b""
    with open(path, "rb") as file:
        file.seek(DICOM_PREAMBLE_BYTES + META_GROUP_LENGTH_BYTES + int(length))
        while not inflater.eof and (pending := pending or file.read(INFLATE_CHUNK_BYTES)):
            inflated += len(inflater.decompress(pending, INFLATE_CHUNK_BYTES))  # at most a chunk out
            pending = inflater.unconsumed_tail
            if inflated > budget + DEFLATED_HEADER_BYTES:
                msg = (
                    f"DICOM '{path}' is deflated and inflates to more than {human_bytes(inflated)} (read so far): "
                    f"more than the reader's max_decoded_bytes={budget} ({human_bytes(budget)}) allows for its pixel "
                    f"data and {human_bytes(DEFLATED_HEADER_BYTES)} of other elements; raise it with "
                    "ScanReader(max_decoded_bytes=...) or --data.reader.max_decoded_bytes if the file is genuine."
                )
                raise MvfaInputError(msg)


def _syntax(dataset: Any) -> Any:
    meta = getattr(dataset, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _has_pixels(dataset: Any) -> bool:
    return all(keyword in dataset for keyword in ("Rows", "Columns", "BitsAllocated")) and any(
        keyword in dataset for keyword in PIXEL_KEYWORDS
    )


def _held(dataset: Any, path: str | Path) -> tuple[int, Any]:
    """Bytes of pixel data the file holds, and a buffer positioned at them (the file or the loaded value)."""
    keyword = next(keyword for keyword in PIXEL_KEYWORDS if keyword in dataset)
    element = dataset.get_item(keyword, keep_deferred=True)
    if element.value is not None:
        return len(element.value), BytesIO(element.value)
    file = open(path, "rb")  # noqa: SIM115 - closed by the caller through the returned buffer
    file.seek(element.value_tell)
    available = Path(path).stat().st_size - element.value_tell
    return (available if element.length == 0xFFFFFFFF else min(element.length, available)), file


def _int(dataset: Any, keyword: str, default: int, path: str | Path) -> int:
    """A count of the header (``default`` when absent or empty; a stated 0 frames counts as 1, as viewers read it)."""
    value = dataset.get(keyword, default)
    try:
        number = int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as error:
        msg = f"DICOM '{path}' has {keyword} {value!r}: expected a whole number."
        raise MvfaInputError(msg) from error
    if number == 0 and keyword == "NumberOfFrames":
        return 1
    if number <= 0:
        msg = f"DICOM '{path}' has {keyword} {number}: expected a number above 0."
        raise MvfaInputError(msg)
    return number


def check_layout(dataset: Any, path: str | Path, max_decoded_bytes: int | None = None) -> int:
    """Check the declared pixel data layout against the bytes held and the budget; the number of frames.

    Uncompressed data must hold rows x columns x frames x samples x bits; encapsulated data must
    hold a fragment per frame (RLE data at least 1/64 of its decoded size); the decoded size must
    be within ``max_decoded_bytes`` (:mod:`~anomalib_mvfa.data.budget`). Nothing is decoded.

    Returns:
        The number of frames; 0 for a file without pixel data.

    Raises:
        MvfaInputError: Naming the file, what it declares and what it holds.
    """
    if not _has_pixels(dataset):
        return 0
    rows, columns = _int(dataset, "Rows", 0, path), _int(dataset, "Columns", 0, path)
    frames, samples = _int(dataset, "NumberOfFrames", 1, path), _int(dataset, "SamplesPerPixel", 1, path)
    bits = _int(dataset, "BitsAllocated", 0, path)
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    syntax = _syntax(dataset)
    encapsulated = syntax is not None and syntax.is_encapsulated
    stored_samples = 2 if photometric == "YBR_FULL_422" and not encapsulated else samples
    declared = (rows * columns * frames * stored_samples * bits + 7) // 8
    layout = f"{frames} frame(s) of {rows} x {columns} pixels x {samples} sample(s) x {bits} bits"
    held, buffer = _held(dataset, path)
    with buffer:
        if not encapsulated:
            check_held(path, "DICOM", layout, declared, held)
        else:
            _check_fragments(buffer, path, frames, syntax)
            if syntax == _pydicom().uid.RLELossless and declared > RLE_MOST_EXPANSION * held:
                msg = (
                    f"DICOM '{path}' declares {layout} = {declared} bytes of pixel data, but its RLE data of "
                    f"{held} bytes decodes to at most {RLE_MOST_EXPANSION * held}: its header is wrong."
                )
                raise MvfaInputError(msg)
    check_budget(path, "DICOM", layout, declared, max_decoded_bytes)
    return frames


def _check_fragments(buffer: Any, path: str | Path, frames: int, syntax: Any) -> None:
    """Encapsulated data: a fragment for each declared frame, and a basic offset table of one entry per frame."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments  # noqa: PLC0415

    try:
        offsets = parse_basic_offsets(buffer)
        fragments, _ = parse_fragments(buffer)
    except Exception as error:
        msg = f"DICOM '{path}' has encapsulated ('{syntax.name}') pixel data that cannot be parsed: {error}"
        raise MvfaInputError(msg) from error
    if fragments < frames or (offsets and len(offsets) != frames):
        msg = (
            f"DICOM '{path}' declares {frames} frame(s) but its encapsulated ('{syntax.name}') pixel data holds "
            f"{fragments} fragment(s) and a basic offset table of {len(offsets)} frame(s): its header is wrong."
        )
        raise MvfaInputError(msg)


def dicom_frame_count(path: str | Path, max_decoded_bytes: int | None = None) -> int:
    """Number of frames of a DICOM file; 0 for one without pixel data (a report, a presentation state).

    The layout is checked first (:func:`check_layout`): a file declaring more frames than it holds is refused.
    """
    dataset = _read(path, pixels=True, defer=True, max_decoded_bytes=max_decoded_bytes)
    syntax = _syntax(dataset)
    if syntax is not None and syntax.is_deflated:  # positions are in the inflated stream: read it whole
        dataset = _read(path, pixels=True, max_decoded_bytes=max_decoded_bytes)
    return check_layout(dataset, path, max_decoded_bytes)


def read_header(path: str | Path, max_decoded_bytes: int | None = None) -> Any:
    """The data set without its pixel data (``stop_before_pixels``), errors naming the file."""
    return _read(path, pixels=False, max_decoded_bytes=max_decoded_bytes)


def dicom_size(path: str | Path) -> tuple[int, int]:
    """``(rows, columns)`` from the header."""
    dataset = _read(path, pixels=False)
    return int(dataset.Rows), int(dataset.Columns)


def _decode(dataset: Any, path: str | Path, frame: int, max_decoded_bytes: int | None = None) -> np.ndarray:
    """One frame's stored values; YBR as RGB. Errors name the file and its transfer syntax.

    The layout is checked first (:func:`check_layout`), so nothing is allocated for a file that lies.
    """
    pydicom = _pydicom()
    from pydicom.pixels import get_decoder, pixel_array  # noqa: PLC0415

    frames = check_layout(dataset, path, max_decoded_bytes)
    if frames == 0:
        msg = f"DICOM '{path}' holds no pixel data (SOP class {dataset.get('SOPClassUID', 'unknown')!s})."
        raise MvfaInputError(msg)
    syntax = _syntax(dataset)
    syntax_name = f"'{syntax.name}' ({syntax})" if syntax is not None else "not stated"
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


def read_dicom_stored(path: str | Path, frame: int = 0, max_decoded_bytes: int | None = None) -> np.ndarray:
    """One frame's stored values, decoded (a DICOM mask's labels)."""
    return _decode(_read(path, pixels=True, max_decoded_bytes=max_decoded_bytes), path, frame, max_decoded_bytes)


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


def _pydicom_step(path: str | Path, doing: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)``, its errors re-raised naming the file and what was being done."""
    try:
        return function(*args, **kwargs)
    except MvfaInputError:
        raise
    except Exception as error:
        msg = f"DICOM '{path}' cannot be read: {doing} failed ({type(error).__name__}: {error})."
        raise MvfaInputError(msg) from error


def _voi_lut(dataset: Any, path: str | Path) -> Callable[[np.ndarray], np.ndarray]:
    """The file's first VOI LUT as a map to ``[0, 1]``; a LUT PS3.3 C.11.2.1.1 does not allow is refused."""
    from pydicom.pixels import apply_voi_lut  # noqa: PLC0415

    item = dataset.VOILUTSequence[0]
    descriptor = item.get("LUTDescriptor")
    bits = int(descriptor[2]) if descriptor is not None and len(descriptor) == 3 else None
    if bits is None or not VOI_LUT_BITS[0] <= bits <= VOI_LUT_BITS[1] or "LUTData" not in item:
        stated = "no LUT data" if "LUTData" not in item else f"LUT descriptor {list(descriptor or [])}"
        msg = (
            f"DICOM '{path}' has a VOI LUT with {stated}: the DICOM standard (PS3.3 C.11.2.1.1) needs 3 "
            f"descriptor values and {VOI_LUT_BITS[0]} to {VOI_LUT_BITS[1]} bits per entry. Choose another "
            "--data.reader.intensity ('bits', 'range', 'percentile' or 'window') to ignore the file's VOI LUT."
        )
        raise MvfaInputError(msg)
    top = float(2**bits - 1)
    return lambda values: (
        _pydicom_step(path, "applying its VOI LUT", apply_voi_lut, values, dataset, index=0, prefer_lut=True) / top
    )


def _refuse_width(path: str | Path, width: float, function: str, needed: str) -> None:
    msg = (
        f"DICOM '{path}' has window width {width:g} with VOI LUT function {function}: the DICOM standard "
        f"(PS3.3 C.11.2.1.2) needs a width {needed}. Choose another --data.reader.intensity ('bits', 'range', "
        "'percentile' or 'window') to ignore the file's window."
    )
    raise MvfaInputError(msg)


def file_window(dataset: Any, path: str | Path = "<dataset>") -> Callable[[np.ndarray], np.ndarray] | None:
    """The file's VOI as a map to ``[0, 1]``: its VOI LUT, else its first window; ``None`` without either.

    Windows follow PS3.3 C.11.2.1.2: ``LINEAR`` needs a width of at least 1 (a width of 1 is a
    threshold at ``centre - 0.5``), ``LINEAR_EXACT`` and ``SIGMOID`` a width above 0.

    Raises:
        MvfaInputError: For a width or a VOI LUT the standard does not allow, naming the file.
    """
    if "VOILUTSequence" in dataset:
        return _voi_lut(dataset, path)
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    centre, width = _first(dataset["WindowCenter"].value), _first(dataset["WindowWidth"].value)
    function = str(dataset.get("VOILUTFunction", "LINEAR")).upper()
    if not (np.isfinite(centre) and np.isfinite(width)):
        _refuse_width(path, width, function, "and centre that are numbers")
    if function == "SIGMOID":
        if width <= 0:
            _refuse_width(path, width, function, "above 0")
        return lambda values: 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            _refuse_width(path, width, function, "above 0")
        return lambda values: np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    if width < 1:
        _refuse_width(path, width, function, "of at least 1")
    if width == 1:  # PS3.3 C.11.2.1.2.1: values up to centre - 0.5 are the lowest output, the rest the highest
        return lambda values: (values > centre - 0.5).astype(np.float64)
    centre, width = centre - 0.5, width - 1.0
    return lambda values: np.clip((values - centre) / width + 0.5, 0.0, 1.0)


def read_dicom(
    path: str | Path, frame: int = 0, intensity: Intensity | None = None, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """One frame of a DICOM file as ``H x W x 3`` float32 in ``[0, 1]`` (see the module docstring).

    Raises:
        ValueError: If the file has no pixel data, declares more than it holds or than ``max_decoded_bytes``
            (:func:`check_layout`), cannot be decoded with what is installed (the message names the transfer
            syntax and the decoders to install), has no such frame, or a window or VOI LUT the standard does
            not allow; every error of pydicom is re-raised naming the file and the step.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut  # noqa: PLC0415

    dataset = _read(path, pixels=True, max_decoded_bytes=max_decoded_bytes)
    stored = _decode(dataset, path, frame, max_decoded_bytes)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    intensity = intensity or Intensity()
    palette = photometric == "PALETTE COLOR"
    if palette:
        stored = _pydicom_step(path, "applying its palette colour LUT", apply_color_lut, stored, dataset)
        photometric = "RGB"
    if photometric.startswith("MONOCHROME"):
        values = _pydicom_step(path, "applying its modality LUT", apply_modality_lut, stored, dataset)
        window = file_window(dataset, path) if intensity.mode == "auto" else None  # only "auto" shows it
        unit = _pydicom_step(
            path,
            "mapping its values to [0, 1]",
            scale_values,
            np.asarray(values),
            intensity,
            type_range=_stored_range(dataset),
            # every DICOM states its bits; "auto" shows it as a viewer does (window, else percentiles)
            declared_range=_stored_range(dataset) if intensity.mode == "bits" else None,
            file_window=window,
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
