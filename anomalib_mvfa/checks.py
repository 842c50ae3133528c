"""Checks of what reaches :class:`~anomalib_mvfa.Mvfa`: its learning rates and the images of its batches.

Images enter the model in ``[0, 1]``. anomalib's ``ImageBatch`` turns an 8-bit batch into float
values 0 to 255 without scaling (its ``ImageItem`` scales), and the pre-processor then normalises
them as if they were ``[0, 1]``: such a batch is refused before the pre-processor sees it.

Example:
    >>> resolve_learning_rates(None, 0.0, default=1e-3)
    (0.001, 0.0)
    >>> check_image_range(torch.rand(2, 3, 8, 8))
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import Callback

from .errors import MvfaInputError

__all__ = ["IMAGE_RANGE", "ImageRangeCheck", "check_batch_images", "check_image_range", "resolve_learning_rates"]

logger = logging.getLogger(__name__)

# Values of images in [0, 1] after resampling (bicubic overshoot included); 8-bit values are far beyond.
IMAGE_RANGE = (-0.5, 1.5)


def resolve_learning_rates(seg: float | None, det: float | None, default: float) -> tuple[float, float]:
    """The segmentation and detection learning rates: ``None`` is ``default``, ``0`` keeps those adapters.

    Raises:
        MvfaInputError: If a rate is negative, NaN, infinite or not a number.

    Example:
        >>> resolve_learning_rates(2e-4, None, default=1e-3)
        (0.0002, 0.001)
    """
    rates = []
    for name, branch, value in (("seg_learning_rate", "segmentation", seg), ("det_learning_rate", "detection", det)):
        if value is None:
            rates.append(float(default))
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            msg = f"{name} must be a finite number >= 0 (0 leaves the {branch} adapters as they are), got {value!r}."
            raise MvfaInputError(msg)
        if value == 0:
            logger.warning("%s=0: the %s adapters stay as they are while the others train.", name, branch)
        rates.append(float(value))
    return rates[0], rates[1]


def check_image_range(images: torch.Tensor, name: str = "images") -> None:
    """Refuse integer images, and float images beyond :data:`IMAGE_RANGE` (0-255 values, say).

    NaN values pass (the model's own check names them); so do empty and meta tensors.

    Raises:
        MvfaInputError: Naming the dtype or the range found, and how to bring the images to ``[0, 1]``.

    Example:
        >>> check_image_range(torch.full((1, 3, 4, 4), 255.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        anomalib_mvfa.errors.MvfaInputError: images hold values from 255 to 255; Mvfa takes images in [0, 1] ...
    """
    if not isinstance(images, torch.Tensor) or images.numel() == 0 or images.is_meta:
        return
    if not images.is_floating_point():
        msg = (
            f"{name} has dtype {images.dtype}; Mvfa takes float images in [0, 1]: divide 8-bit images by 255 "
            "(images.float() / 255)."
        )
        raise MvfaInputError(msg)
    finite = images[torch.isfinite(images)]
    if finite.numel() == 0:
        return
    low, high = (float(value) for value in torch.aminmax(finite))
    if low < IMAGE_RANGE[0] or high > IMAGE_RANGE[1]:
        msg = (
            f"{name} hold values from {low:g} to {high:g}; Mvfa takes images in [0, 1] (anomalib's ImageBatch "
            "keeps 8-bit images at 0 to 255 when it makes them float): divide them by 255, or by their maximum."
        )
        raise MvfaInputError(msg)


def check_batch_images(batch: Any) -> None:
    """:func:`check_image_range` of ``batch.image`` (anomalib's batches), before the pre-processor.

    Example:
        >>> from anomalib.data import ImageBatch
        >>> check_batch_images(ImageBatch(image=torch.rand(2, 3, 8, 8)))
    """
    check_image_range(getattr(batch, "image", None), "images of the batch")


class ImageRangeCheck(Callback):
    """:func:`check_batch_images` of every validation, test and prediction batch, before the pre-processor.

    ``Mvfa`` lists it before its pre-processor, which transforms ``batch.image`` in the same hooks.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ImageRangeCheck()])  # doctest: +SKIP
    """

    @staticmethod
    def on_validation_batch_start(*args: Any, **kwargs: Any) -> None:
        """Check the batch."""
        _check_hook_batch(*args, **kwargs)

    on_test_batch_start = on_validation_batch_start
    on_predict_batch_start = on_validation_batch_start


def _check_hook_batch(_trainer: object, _module: object, batch: Any, *_args: object, **_kwargs: object) -> None:
    check_batch_images(batch)
