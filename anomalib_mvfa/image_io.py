"""Reading image and mask files as they come from scanners and annotation tools.

Images: 8- and 16-bit PNG, JPEG, TIFF, one to four channels (grey and grey+alpha are
replicated to three channels, alpha is dropped), any letter case of the file suffix.
Masks: binary masks with any "on" value (0/1, 0/255, 0/65535); other masks are binarised
at half of their value range, with a warning that states the threshold.

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


def read_mask_file(path: str | Path) -> torch.Tensor:
    """Read a mask as an ``H x W`` uint8 tensor of 0 and 1.

    A mask holding 0 and one other value marks the pixels of that value abnormal, whatever it
    is (1, 255, 65535). A mask with more values (anti-aliased edges, JPEG) is binarised at
    :data:`MASK_THRESHOLD` of its value range (128 for 8-bit files), and a warning says so.

    Raises:
        ValueError: If the file cannot be decoded, naming it.
    """
    values = torch.from_numpy(np.ascontiguousarray(_read_scaled(path)[..., 0]))
    distinct = torch.unique(values)
    if distinct.numel() == 1 or (distinct.numel() == 2 and distinct[0] == 0):
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
