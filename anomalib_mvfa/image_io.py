"""Reading image and mask files as they come from scanners and annotation tools.

Images: 8- and 16-bit PNG, JPEG, TIFF, one to four channels (grey and grey+alpha are
replicated to three channels, alpha is dropped), any letter case of the file suffix.
Masks: what marks a pixel abnormal is read from every channel that varies, alpha included
(a green, blue or alpha-only annotation counts); binary masks with any "on" value (0/1, 0/255,
0/65535) and label maps (0/1/2..., any non-zero label, with a warning naming the labels) keep
every non-zero pixel; soft masks (anti-aliased or JPEG, values up to the top of the range) are
binarised at half of their value range, with a warning that states the threshold.

Example:
    >>> from anomalib_mvfa.image_io import read_image_file, read_mask_file
    >>> image = read_image_file("scan.png")  # 3 x H x W in [0, 1]  # doctest: +SKIP
    >>> mask = read_mask_file("scan_mask.png")  # H x W of 0 and 1  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# A mask that is not binary counts pixels at or above this share of its value range as abnormal.
MASK_THRESHOLD = 0.5
# Most distinct values a mask may hold to be read as a label map (0 and a few labels).
MAX_LABELS = 16


def _label_numbers(path: str | Path, fractions: torch.Tensor) -> list[int]:
    """The integer labels behind values scaled to ``[0, 1]`` (8-bit files by 255, others by 65535)."""
    with Image.open(path) as image:
        eight_bit = image.mode in {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
    scale = 255 if eight_bit else 65535
    return [round(float(value) * scale) for value in fractions]


def _read_scaled(path: str | Path) -> np.ndarray:
    """``H x W x C`` float32 array in ``[0, 1]``: 8-bit / 255, 16-bit / 65535, floats clipped."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except Exception as error:
        msg = f"Image '{path}' cannot be decoded: {error}"
        raise ValueError(msg) from error
    if array.dtype in {np.dtype(np.uint8), np.dtype(bool)}:
        scaled = array.astype(np.float32) / (1.0 if array.dtype == bool else 255.0)
    elif array.dtype.kind in "ui":
        scaled = array.astype(np.float32) / 65535.0
    else:
        scaled = np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0)
    return scaled if scaled.ndim == 3 else scaled[..., None]


def read_image_file(path: str | Path) -> torch.Tensor:
    """Read an image as a ``3 x H x W`` float tensor in ``[0, 1]``.

    8-bit images are divided by 255, 16-bit ones by 65535; floating-point images are clipped
    to ``[0, 1]``. One or two channels (grey, grey + alpha) become three (grey replicated),
    four (RGBA) become three.

    Raises:
        ValueError: If the file cannot be decoded, naming it.
    """
    scaled = _read_scaled(path)
    channels = scaled.shape[-1]
    scaled = np.repeat(scaled[..., :1], 3, axis=-1) if channels < 3 else scaled[..., :3]
    return torch.from_numpy(np.ascontiguousarray(scaled)).permute(2, 0, 1)


def _mask_values(path: str | Path) -> np.ndarray:
    """``H x W`` values of a mask in ``[0, 1]`` of its type's range: the maximum over the channels that vary.

    Channels that are the same everywhere (an opaque alpha, an unused colour) carry no annotation;
    palette masks are read as their indices (the labels of annotation tools).
    """
    try:
        with Image.open(path) as image:
            if image.mode in {"P", "PA"}:
                indices = np.asarray(image.getchannel(0), dtype=np.float32)
                return indices / 255.0
    except Exception as error:
        msg = f"Mask '{path}' cannot be decoded: {error}"
        raise ValueError(msg) from error
    scaled = _read_scaled(path)
    varying = [channel for channel in range(scaled.shape[-1]) if np.ptp(scaled[..., channel]) > 0]
    if not varying:  # constant: its colour (not its alpha) says whether everything is abnormal
        colour = scaled[..., : 3 if scaled.shape[-1] >= 3 else 1]
        return colour.max(axis=-1)
    return scaled[..., varying].max(axis=-1)


def read_mask_file(path: str | Path) -> torch.Tensor:
    """Read a mask as an ``H x W`` uint8 tensor of 0 and 1.

    Every channel that varies counts, alpha included (an annotation drawn in green, blue or
    alpha alone is read). A mask holding 0 and one other value marks the pixels of that value
    abnormal, whatever it is (1, 255, 65535). A label map (a few small integer labels, all below
    half of the value range, such as 0/1/2) marks every non-zero label abnormal, with a warning
    naming the labels. Other masks (anti-aliased edges, JPEG) are binarised at
    :data:`MASK_THRESHOLD` of their value range (128 for 8-bit files), and a warning says so.

    Raises:
        ValueError: If the file cannot be decoded, naming it.
    """
    values = torch.from_numpy(np.ascontiguousarray(_mask_values(path)))
    distinct = torch.unique(values)
    if distinct.numel() == 1 or (distinct.numel() == 2 and distinct[0] == 0):
        return (values > 0).to(torch.uint8)
    if distinct[-1] < MASK_THRESHOLD and distinct.numel() <= MAX_LABELS:
        labels = _label_numbers(path, distinct[1:])
        logger.warning(
            "Mask '%s' is a label map with labels %s besides 0: every non-zero label counts as abnormal.",
            path,
            labels,
        )
        return (values > 0).to(torch.uint8)
    logger.warning(
        "Mask '%s' is not binary (%d distinct values from %.4g to %.4g of the full range): pixels at or above "
        "%.2f of the full range count as abnormal.",
        path,
        distinct.numel(),
        float(distinct[0]),
        float(distinct[-1]),
        MASK_THRESHOLD,
    )
    return (values >= MASK_THRESHOLD).to(torch.uint8)
