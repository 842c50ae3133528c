"""DICOM Segmentations and Parametric Maps (highdicom): results written back, ground truth read in.

Reading: a DICOM Segmentation in a mask folder is the mask of the images it references
(:func:`segmentation_index`), paired by their SOP Instance UIDs, not by file names;
:func:`read_segmentation_mask` gives the mask of one source image (every segment non-zero is
abnormal; a source image without a frame in the Segmentation has an empty mask).

Writing:
For every scored DICOM series, :func:`write_series_results` writes

- ``<series UID>_seg.dcm``: a binary DICOM Segmentation of the predicted mask, one frame per
  scored slice (empty slices included), segment 1 "anomaly";
- ``<series UID>_anomaly_map.dcm``: a float Parametric Map of the anomaly map (the model's
  normalised scores, as ``VolumeMapWriter`` writes NIfTI maps), one frame per scored slice.

Both are made with `highdicom <https://highdicom.readthedocs.io>`_ from the source files' headers:
they reference the source series and instances, and take the source's frame of reference, plane
positions and orientation, pixel spacing and patient and study attributes, so that a viewer
(a PACS viewer, OHIF, 3D Slicer) shows them over the series. Each file is written atomically.

Example:
    >>> from anomalib_mvfa.data.dicom_results import write_series_results
    >>> write_series_results(files, maps, masks, "results/dicom")  # doctest: +SKIP
    [PosixPath('results/dicom/1.2.3_seg.dcm'), PosixPath('results/dicom/1.2.3_anomaly_map.dcm')]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MvfaInputError, medical_extra
from ..utils import write_atomically
from . import dicom
from .formats import file_format

MANUFACTURER = "anomalib-mvfa"
MODEL_NAME = "MVFA"
SEGMENT_LABEL = "anomaly"
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _highdicom() -> Any:
    return medical_extra("highdicom", "Writing DICOM Segmentations and Parametric Maps")


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """Only the warnings of highdicom, which logs every module it copies at INFO (dozens of lines a series)."""
    highdicom_logger = logging.getLogger("highdicom")
    level = highdicom_logger.level
    highdicom_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        highdicom_logger.setLevel(level)


def _version() -> str:
    from .. import __version__  # noqa: PLC0415

    return str(__version__)


def _algorithm(highdicom: Any) -> Any:
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    return highdicom.AlgorithmIdentificationSequence(
        name=MODEL_NAME, family=codes.cid7162.ArtificialIntelligence, version=_version()
    )


def _new_series(highdicom: Any, series_number: int, description: str) -> dict[str, Any]:
    """The attributes of a new derived series of one instance, made by this package."""
    return {
        "series_instance_uid": highdicom.UID(),
        "series_number": series_number,
        "series_description": description,
        "sop_instance_uid": highdicom.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": _version(),
        "device_serial_number": "none",
    }


def make_segmentation(sources: Sequence[Any], masks: np.ndarray, series_number: int = 900) -> Any:
    """A binary DICOM Segmentation of ``masks`` (``slices x rows x columns``, 0/1) over ``sources``."""
    highdicom = _highdicom()
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    segment = highdicom.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm(highdicom),
    )
    return highdicom.seg.Segmentation(
        source_images=list(sources),
        pixel_array=np.asarray(masks, dtype=bool),
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        **_new_series(highdicom, series_number, "MVFA predicted anomaly mask"),
        omit_empty_frames=False,  # one frame per slice: a viewer shows the slices without anomaly as empty
    )


def make_parametric_map(sources: Sequence[Any], maps: np.ndarray, series_number: int = 901) -> Any:
    """A float32 DICOM Parametric Map of ``maps`` (``slices x rows x columns``) over ``sources``."""
    highdicom = _highdicom()
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    values = np.asarray(maps, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    mapping = highdicom.pm.RealWorldValueMapping(
        lut_label="anomaly",
        lut_explanation="MVFA anomaly score",
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),
        slope=1,
        intercept=0,
    )
    return highdicom.pm.ParametricMap(
        source_images=list(sources),
        pixel_array=values,
        **_new_series(highdicom, series_number, "MVFA anomaly map"),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            highdicom.VOILUTTransformation(window_center=(low + high) / 2, window_width=max(high - low, 1e-6))
        ],
        content_label="ANOMALY",
    )


def write_series_results(
    files: Sequence[str | Path],
    maps: np.ndarray,
    masks: np.ndarray | None,
    output_dir: str | Path,
    stem: str | None = None,
) -> list[Path]:
    """Write the Segmentation (when ``masks`` is given) and the Parametric Map of one series' scored slices.

    Args:
        files: The source files of the scored slices, in the order of ``maps`` (anatomical order).
        maps: ``slices x rows x columns`` anomaly maps at the source's size.
        masks: ``slices x rows x columns`` predicted masks (0/1), or ``None``.
        output_dir: Folder of the results.
        stem: File name stem; the series UID when ``None``.

    Returns:
        The written files.

    Raises:
        MvfaInputError: If the series cannot be written (missing geometry, frame of reference, ...), naming why.
    """
    sources = [dicom.read_header(path) for path in files]
    uid = str(sources[0].get("SeriesInstanceUID", ""))
    multi_frame = len(sources) == 1 and int(sources[0].get("NumberOfFrames", 1) or 1) > 1
    if multi_frame and "PerFrameFunctionalGroupsSequence" not in sources[0]:
        msg = (
            f"DICOM '{files[0]}' is a multi-frame file without per-frame positions (no "
            "PerFrameFunctionalGroupsSequence, as enhanced multi-frame images have): a Segmentation or Parametric "
            "Map cannot place its frames."
        )
        raise MvfaInputError(msg)
    stem = stem or uid
    output_dir = Path(output_dir)
    written = []
    try:
        with _quiet_highdicom():
            objects = [("anomaly_map", make_parametric_map(sources, maps))]
            if masks is not None:
                objects.insert(0, ("seg", make_segmentation(sources, masks)))
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        msg = f"DICOM series '{uid or files[0]}' cannot be written as DICOM results: {error}"
        raise MvfaInputError(msg) from error
    for kind, result in objects:
        written.append(write_atomically(output_dir / f"{stem}_{kind}.dcm", result.save_as))
    return written


def is_segmentation(path: str | Path) -> bool:
    """Whether a DICOM file is a Segmentation (its SOP class), from its header."""
    try:
        return str(dicom.read_header(path).get("SOPClassUID", "")) == SEGMENTATION_SOP_CLASS
    except MvfaInputError:
        return False


def segmentation_references(path: str | Path) -> list[str]:
    """SOP Instance UIDs of the source images a Segmentation references (its ``ReferencedSeriesSequence``)."""
    header = dicom.read_header(path)
    return [
        str(item.ReferencedSOPInstanceUID)
        for series in header.get("ReferencedSeriesSequence", [])
        for item in series.get("ReferencedInstanceSequence", [])
    ]


def segmentation_index(files: Iterable[str | Path]) -> dict[str, Path]:
    """``{source SOP Instance UID: Segmentation file}`` of the DICOM Segmentations among ``files``.

    Raises:
        MvfaInputError: If two Segmentations reference the same image, naming both.
    """
    index: dict[str, Path] = {}
    for path in files:
        if file_format(path) != "dicom" or not is_segmentation(path):
            continue
        for uid in segmentation_references(path):
            if index.setdefault(uid, Path(path)) != Path(path):
                msg = f"DICOM Segmentations '{index[uid]}' and '{path}' both reference the image {uid}: keep one."
                raise MvfaInputError(msg)
    return index


@lru_cache(maxsize=4)
def _segmentation(path: str, modified: float) -> Any:
    del modified  # part of the cache key: a rewritten file is read again
    highdicom = _highdicom()
    try:
        return highdicom.seg.segread(path)
    except Exception as error:
        msg = f"DICOM Segmentation '{path}' cannot be read: {error}"
        raise MvfaInputError(msg) from error


def read_segmentation_mask(path: str | Path, source_uid: str) -> np.ndarray:
    """The mask (``rows x columns``, uint8 0/1) a Segmentation holds for the source image ``source_uid``.

    Raises:
        MvfaInputError: If the file cannot be read or does not reference that image, naming both.
    """
    segmentation = _segmentation(str(path), Path(path).stat().st_mtime)
    try:
        pixels = segmentation.get_pixels_by_source_instance(
            [source_uid], combine_segments=True, skip_overlap_checks=True
        )
    except (ValueError, KeyError, IndexError) as error:
        msg = f"DICOM Segmentation '{path}' holds no mask of the image {source_uid}: {error}"
        raise MvfaInputError(msg) from error
    return (np.asarray(pixels[0]) > 0).astype(np.uint8)
