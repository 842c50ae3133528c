"""2D image files (PNG, JPEG, TIFF, BMP, WebP) read through PIL, every mode converted right.

- Colour modes are converted by PIL itself: palette (``P``, ``PA``) to its colours, ``CMYK``,
  ``YCbCr``, ``LAB`` and ``HSV`` to RGB; ``1`` to 0 and 1; grey (``L``, ``LA``, ``I;16`` in any byte
  order, ``I``, ``F``) is replicated to three channels; alpha is dropped.
- The EXIF orientation is applied to images and masks alike, so a rotated photograph and its
  mask stay aligned.
- Multi-page TIFFs are read page by page (:func:`page_count`).
- Intensity: see :mod:`anomalib_mvfa.data.intensity`. The stored type comes from the file (a
  signed 16-bit TIFF is signed 16-bit even though PIL widens it), the significant bits from PNG's
  ``sBIT`` chunk or TIFF's ``MaxSampleValue``/``SMaxSampleValue``.

Masks: every channel that varies marks anomalies, alpha included; see :func:`mask_values`.

Example:
    >>> from anomalib_mvfa.data.image_io import read_plain_image
    >>> image = read_plain_image("slide.jpg")  # H x W x 3 in [0, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import MvfaInputError
from .budget import check_budget
from .intensity import Intensity, dtype_range, scale_values

# what anomalib and torchvision list as images, and a few more formats PIL reads
PLAIN_SUFFIXES = (
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".gif",
    ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".j2k", ".tga",
)  # fmt: skip
# formats a visualisation can be written in under the sample's own name
DISPLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# PIL modes converted to RGB by PIL (their channels are not red, green and blue)
_TO_RGB = {"P": "RGB", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB", "1": "L"}
# TIFF tags
_BITS_PER_SAMPLE, _SAMPLE_FORMAT, _MAX_SAMPLE_VALUE, _S_MAX_SAMPLE_VALUE = 258, 339, 281, 341


def _open(path: str | Path) -> Image.Image:
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:  # Pillow's own limit, before the reader's budget is asked
        msg = (
            f"Image '{path}' cannot be decoded: {error} This limit is Pillow's (twice PIL.Image.MAX_IMAGE_PIXELS), "
            "apart from the reader's max_decoded_bytes; for a genuine image set PIL.Image.MAX_IMAGE_PIXELS = None "
            "before the run and the reader's budget (--data.reader.max_decoded_bytes) still bounds it."
        )
        raise MvfaInputError(msg) from error
    except Exception as error:
        msg = f"Image '{path}' cannot be decoded: {error}"
        raise MvfaInputError(msg) from error


def _bytes_per_band(mode: str) -> int:
    """Bytes of one decoded value of a PIL mode: 2 for ``I;16*``, 4 for ``I`` and ``F``, else 1."""
    if mode.startswith("I;16"):
        return 2
    return 4 if mode in {"I", "F"} or mode.startswith("I;32") else 1


def check_pixels(image: Image.Image, path: str | Path, max_decoded_bytes: int | None = None) -> None:
    """Refuse an opened image (its current page) whose header declares more than ``max_decoded_bytes``, before loading.

    Raises:
        MvfaInputError: Naming the file, its pixels and the setting.
    """
    width, height = image.size
    bands, size = len(image.getbands()), _bytes_per_band(image.mode)
    layout = f"{width} x {height} pixels x {bands} band(s) x {size} byte(s) ({image.format} {image.mode})"
    check_budget(path, "Image", layout, width * height * bands * size, max_decoded_bytes)


def page_count(path: str | Path) -> int:
    """Number of pages (frames) of an image file: several for a multi-page TIFF, else 1."""
    with _open(path) as image:
        return int(getattr(image, "n_frames", 1) or 1)


def plain_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the header, after the EXIF orientation."""
    with _open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    return (width, height) if orientation in {5, 6, 7, 8} else (height, width)


def _png_significant_bits(path: str | Path) -> int | None:
    """Largest bit count of the PNG ``sBIT`` chunk, ``None`` when the file has none."""
    with open(path, "rb") as file:
        if file.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while header := file.read(8):
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"sBIT":
                return max(file.read(length))
            if kind in {b"IDAT", b"IEND"}:
                return None
            file.seek(length + 4, 1)  # data and CRC
    return None


def _stored_type(image: Image.Image, array: np.ndarray) -> np.dtype:
    """The type the file stores (PIL widens signed 16-bit TIFF samples to 32-bit)."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None and _BITS_PER_SAMPLE in tags:
        bits = tags[_BITS_PER_SAMPLE]
        bits = int(bits[0] if isinstance(bits, tuple) else bits)
        sample_format = tags.get(_SAMPLE_FORMAT, 1)
        sample_format = int(sample_format[0] if isinstance(sample_format, tuple) else sample_format)
        if sample_format in {1, 2} and bits in {8, 16, 32}:
            return np.dtype(f"{'u' if sample_format == 1 else 'i'}{bits // 8}")
    return array.dtype.newbyteorder("=")


def _declared_range(path: str | Path, image: Image.Image) -> tuple[float, float] | None:
    """The value range the file states through its significant bits, if it states one."""
    tags = getattr(image, "tag_v2", None)
    if tags is not None:
        for tag in (_S_MAX_SAMPLE_VALUE, _MAX_SAMPLE_VALUE):
            if tag in tags:
                value = tags[tag]
                return 0.0, float(max(value) if isinstance(value, tuple) else value)
    if image.format == "PNG":
        bits = _png_significant_bits(path)
        if bits:
            return 0.0, float(2**bits - 1)
    return None


def _decoded(
    path: str | Path, page: int, max_decoded_bytes: int | None = None
) -> tuple[np.ndarray, np.dtype, tuple[float, float] | None]:
    """``H x W x C`` values, the stored type and the declared range of one page (checked by :func:`check_pixels`)."""
    with _open(path) as image:
        try:
            if page:
                image.seek(page)
            check_pixels(image, path, max_decoded_bytes)
            oriented = ImageOps.exif_transpose(image)
            converted = oriented.convert(_TO_RGB[oriented.mode]) if oriented.mode in _TO_RGB else oriented
            array = np.asarray(converted)
        except EOFError as error:
            msg = f"Image '{path}' has no page {page}: it has {page_count(path)}."
            raise MvfaInputError(msg) from error
        except (MvfaInputError, MemoryError):
            raise  # a MemoryError is named by the reader, with the budget
        except Exception as error:
            msg = f"Image '{path}' cannot be decoded: {error or type(error).__name__}"
            raise MvfaInputError(msg) from error
        stored = np.dtype(np.uint8) if converted is not oriented else _stored_type(image, array)
        declared = _declared_range(path, image)
    return (array if array.ndim == 3 else array[..., None]), stored, declared


def read_plain_image(
    path: str | Path, page: int = 0, intensity: Intensity | None = None, max_decoded_bytes: int | None = None
) -> np.ndarray:
    """One page of an image file as ``H x W x 3`` float32 in ``[0, 1]``.

    Args:
        path: The file.
        page: Page of a multi-page TIFF.
        intensity: How values become ``[0, 1]``; ``Intensity()`` (``"auto"``) by default.
        max_decoded_bytes: The most decoded bytes the page may declare (:func:`check_pixels`).

    Raises:
        ValueError: If the file or page cannot be decoded or declares more than ``max_decoded_bytes``, naming it.
    """
    array, stored, declared = _decoded(path, page, max_decoded_bytes)
    grey = array.shape[-1] < 3
    unit = scale_values(
        array[..., :1] if grey else array[..., :3],  # percentiles of the grey values themselves
        intensity or Intensity(),
        type_range=dtype_range(stored),
        declared_range=declared,
        eight_bit=stored.itemsize == 1 or stored == np.dtype(bool),
    )
    return np.repeat(unit, 3, axis=-1) if grey else unit


def mask_values(path: str | Path, page: int = 0, max_decoded_bytes: int | None = None) -> tuple[np.ndarray, float]:
    """``H x W`` mask values as fractions of the type range, the maximum over the channels that vary.

    Channels that are the same everywhere (an opaque alpha, an unused colour) carry no annotation;
    palette masks are read as their indices (the labels of annotation tools).

    Returns:
        The values and the type's largest value (to name labels in messages).
    """
    with _open(path) as image:
        if image.mode in {"P", "PA"}:
            check_pixels(image, path, max_decoded_bytes)
            oriented = ImageOps.exif_transpose(image)
            return np.asarray(oriented.getchannel(0), dtype=np.float32) / 255.0, 255.0
    array, stored, _ = _decoded(path, page, max_decoded_bytes)
    _, high = dtype_range(stored)
    scaled = (
        np.clip(array.astype(np.float32), 0.0, 1.0)
        if stored.kind == "f"
        else (array.astype(np.float64) / max(high, 1.0)).astype(np.float32)
    )
    varying = [channel for channel in range(scaled.shape[-1]) if np.ptp(scaled[..., channel]) > 0]
    if not varying:  # constant: its colour (not its alpha) says whether everything is abnormal
        return scaled[..., : 3 if scaled.shape[-1] >= 3 else 1].max(axis=-1), high
    return scaled[..., varying].max(axis=-1), high
