"""Checking every file of a run's splits before the run spends time on them.

A zero-byte or undecodable image, a file whose header declares more than it holds, a DICOM window
the standard does not allow, or a mask of another size than its image, would otherwise surface
when the test starts, minutes or hours after training began, and the trained model would be lost
with the failed test. :func:`check_split_files` reads the header of every image and mask of the
splits a run will use, checks each file's declared pixel data layout against the bytes it holds
and the reader's ``max_decoded_bytes``, decodes the first and the last sample of every file (its
first and last frame, page or slice) and reports every problem at once.

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


def _decode_problem(names: list[str], reader: ScanReader, *, mask: bool) -> str | None:
    """Decode the first and the last sample of one file; the error naming the file, if one fails."""
    for sample in dict.fromkeys((names[0], names[-1])):
        try:
            reader.read_mask(sample) if mask else reader.read_image(sample)
        except ValueError as error:
            return str(error).rstrip(".")
        except Exception as error:  # a decoder's own error: named here, before the run
            return f"'{sample}' cannot be decoded ({type(error).__name__}: {error})"
    return None


def split_file_problems(name: str, dataset: Any) -> list[str]:
    """Problems of the image and mask files of ``dataset`` (anomalib's ``samples`` table)."""
    samples = getattr(dataset, "samples", None)
    if samples is None or "image_path" not in samples:
        return []
    masks = samples["mask_path"] if "mask_path" in samples else [""] * len(samples)
    reader = getattr(dataset, "reader", None) or DEFAULT_READER
    problems = []
    files: dict[tuple[object, bool], list[str]] = {}  # the samples of each file, to decode its first and last
    failed: set[object] = set()
    for image_path, mask_path in zip(samples["image_path"], masks, strict=True):
        listed = [(str(image_path), False)] + ([(mask_path, True)] if isinstance(mask_path, str) and mask_path else [])
        for sample, is_mask in listed:
            files.setdefault((SampleName.parse(sample).file, is_mask), []).append(sample)
        try:
            size = _header_size(str(image_path), reader)
            if len(listed) == 2:
                mask_size = _header_size(mask_path, reader)
                if mask_size != size:
                    problems.append(
                        f"{name}: Mask '{mask_path}' is {mask_size} pixels but its image '{image_path}' is {size}"
                    )
        except ValueError as error:
            problems.append(f"{name}: {error}")
            failed.update(SampleName.parse(sample).file for sample, _ in listed)
    for (file, is_mask), names in files.items():
        problem = None if file in failed else _decode_problem(names, reader, mask=is_mask)
        if problem is not None:
            problems.append(f"{name}: {problem}")
    return problems


def check_split_files(splits: dict[str, Any]) -> None:
    """Check every image and mask file of ``splits`` (``{"test": dataset, ...}``) as the module docstring says.

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
