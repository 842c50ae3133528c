"""Checking every file of a run's splits before the run spends time on them.

A zero-byte or undecodable image, or a mask of another size than its image, would otherwise
surface when the test starts, minutes or hours after training began, and the trained model would
be lost with the failed test. :func:`check_split_files` reads the header of every image and mask
of the splits a run will use (no pixel data) and reports every problem at once.

Example:
    >>> from anomalib_mvfa.data.validation import check_split_files
    >>> check_split_files({"test": datamodule.test_data})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import MvfaInputError
from .readers import DEFAULT_READER, SampleName, ScanReader

logger = logging.getLogger(__name__)

# Problems named in the error; the rest are counted.
MAX_LISTED_PROBLEMS = 10


def _header_size(name: str, reader: ScanReader) -> tuple[int, int]:
    """``(height, width)`` from the file's header; ``ValueError`` naming the file when there is none."""
    path = SampleName.parse(name).file
    if not path.is_file():
        msg = f"'{path}' does not exist"
        raise MvfaInputError(msg)
    if path.stat().st_size == 0:
        msg = f"'{path}' is empty (0 bytes)"
        raise MvfaInputError(msg)
    try:
        return reader.image_size(name)
    except Exception as error:
        msg = f"'{name}' cannot be decoded ({error})"
        raise MvfaInputError(msg) from error


def split_file_problems(name: str, dataset: Any) -> list[str]:
    """Problems of the image and mask files of ``dataset`` (anomalib's ``samples`` table)."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in samples:
        return []
    masks = samples["mask_path"] if "mask_path" in samples else [""] * len(samples)
    reader = getattr(dataset, "reader", None) or DEFAULT_READER
    problems = []
    for image_path, mask_path in zip(samples["image_path"], masks, strict=True):
        try:
            size = _header_size(str(image_path), reader)
            if isinstance(mask_path, str) and mask_path:
                mask_size = _header_size(mask_path, reader)
                if mask_size != size:
                    problems.append(
                        f"{name}: Mask '{mask_path}' is {mask_size} pixels but its image '{image_path}' is {size}"
                    )
        except ValueError as error:
            problems.append(f"{name}: {error}")
    return problems


def check_split_files(splits: dict[str, Any]) -> None:
    """Check the headers of every image and mask of ``splits`` (``{"test": dataset, ...}``).

    Raises:
        ValueError: Listing the problems (the first :data:`MAX_LISTED_PROBLEMS`, and how many more).
    """
    problems = [problem for name, dataset in splits.items() for problem in split_file_problems(name, dataset)]
    counted = sum(len(getattr(dataset, "samples", [])) for dataset in splits.values() if dataset is not None)
    if not problems:
        logger.info("Checked the files of %s: %d image(s), all readable.", ", ".join(splits), counted)
        return
    more = len(problems) - MAX_LISTED_PROBLEMS
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    msg = f"{len(problems)} file problem(s) in the splits this run uses, found before it started: {listed}."
    raise MvfaInputError(msg)
