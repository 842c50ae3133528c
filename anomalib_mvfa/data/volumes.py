"""Anomaly maps of NIfTI slices and DICOM series written back as volumes over their scans.

:class:`VolumeMapWriter` is a Lightning callback: during ``test`` or ``predict`` it collects the
anomaly map (and predicted mask) of every NIfTI slice and DICOM image, resized to the slice's own
size, and at the end writes

- for each NIfTI scan, one volume with the scan's grid, affine and header
  (:func:`~anomalib_mvfa.data.nifti.write_volume`): ``<scan>_anomaly_map.nii.gz`` (float32, the
  model's normalised scores) and ``<scan>_pred_mask.nii.gz`` (uint8), to open over the scan in 3D
  Slicer or ITK-SNAP; slices that were not scored (``skip_empty_slices``) are 0;
- for each DICOM series (single-frame files grouped by ``SeriesInstanceUID``, or a multi-frame
  file), a DICOM Segmentation of the predicted mask and a Parametric Map of the anomaly map
  (:mod:`~anomalib_mvfa.data.dicom_results`): ``<series UID>_seg.dcm`` and
  ``<series UID>_anomaly_map.dcm``, referencing the source series and instances. A series that
  cannot be written (no series UID, no geometry, ...) is named with the reason in a warning and in
  :attr:`VolumeMapWriter.not_written`.

Under DDP the processes' slices are gathered and the first process writes the files.

Example:
    >>> from anomalib.engine import Engine
    >>> from anomalib_mvfa.data import ScanFolder, VolumeMapWriter
    >>> engine = Engine(callbacks=[VolumeMapWriter("maps")])  # doctest: +SKIP
    >>> engine.predict(model, datamodule=ScanFolder("scans"), ckpt_path="mvfa.ckpt")  # doctest: +SKIP

    From the command line: ``--trainer.callbacks+=anomalib_mvfa.data.VolumeMapWriter
    --trainer.callbacks.output_dir maps``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from lightning.pytorch import Callback

from ..errors import MvfaInputError
from . import dicom, nifti
from .datasets import file_key
from .dicom_results import write_series_results
from .readers import SampleName, file_format, reader_of
from .series import dicom_headers, group_series

logger = logging.getLogger(__name__)

# Files or series that get no DICOM results named one by one in the log; the rest are counted
LISTED_REASONS = 10


class VolumeMapWriter(Callback):
    """Write the anomaly maps (and predicted masks) of NIfTI slices as volumes (module docstring).

    Args:
        output_dir: Folder of the volumes; ``<default_root_dir>/volumes`` when ``None``.
        masks: Write the predicted masks too (a NIfTI volume, a DICOM Segmentation).
        dicom: Write the results of DICOM series as DICOM (Segmentation and Parametric Map).

    Attributes:
        written: The files written.
        not_written: ``{series or file: reason}`` of the DICOM series that could not be written.
    """

    def __init__(self, output_dir: str | Path | None = None, masks: bool = True, dicom: bool = True) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.masks = masks
        self.dicom = dicom
        self._maps: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
        self._pred_masks: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
        self.written: list[Path] = []
        self.not_written: dict[str, str] = {}
        self._pending: list[Any] = []

    def _collect(self, trainer: Any, outputs: Any) -> None:
        names = getattr(outputs, "image_path", None) or []
        maps = getattr(outputs, "anomaly_map", None)
        pred_masks = getattr(outputs, "pred_mask", None)
        if maps is None:
            return
        time_point = reader_of(getattr(trainer, "datamodule", None)).time_point
        for position, name in enumerate(names):
            sample = SampleName.parse(name)
            kind = file_format(sample.file)
            if kind == "dicom" and self.dicom:
                size = dicom.dicom_size(sample.file)
                key = (str(sample.file), "frame")
            elif sample.part in nifti.SLICE_AXES and kind == "nifti":
                shape = nifti.canonical_shape(sample.file, time_point)
                kept = [size for axis, size in enumerate(shape) if axis != nifti.SLICE_AXES[sample.part]]
                size = (kept[1], kept[0])  # the slice as shown: rows, columns
                key = (str(sample.file), sample.part)
            else:
                continue
            score = maps[position].detach().float().reshape(1, 1, *maps[position].shape[-2:])
            self._maps[key][sample.index] = F.interpolate(score, size=size, mode="bilinear")[0, 0].cpu().numpy()
            if self.masks and pred_masks is not None:
                marked = pred_masks[position].detach().float().reshape(1, 1, *pred_masks[position].shape[-2:])
                resized = F.interpolate(marked, size=size, mode="nearest")[0, 0]
                self._pred_masks[key][sample.index] = (resized > 0.5).to(torch.uint8).cpu().numpy()

    def _hold(self, trainer: Any, outputs: Any) -> None:
        """Keep the batch until anomalib's post-processor, a callback that may run after this one, is done with it.

        The post-processor normalises the maps and thresholds them in place during the same
        round of batch-end hooks; a held batch is collected when the next batch ends, or at the end.
        """
        for held in self._pending:
            self._collect(trainer, held)
        self._pending = [outputs] if outputs is not None else []

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any, **kwargs: Any) -> None:
        """Hold the batch (:meth:`_hold`)."""
        del pl_module, args, kwargs
        self._hold(trainer, outputs)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any, **kwargs: Any) -> None:
        """Hold the batch (:meth:`_hold`)."""
        del pl_module, args, kwargs
        self._hold(trainer, outputs)

    def _gather(self, trainer: Any) -> None:
        """Under DDP, bring every process's slices to each process (each scored a share of them)."""
        if getattr(trainer, "world_size", 1) == 1 or not torch.distributed.is_initialized():
            return
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, (dict(self._maps), dict(self._pred_masks)))
        for maps, pred_masks in gathered:
            for key, slices in maps.items():
                self._maps[key].update(slices)
            for key, slices in pred_masks.items():
                self._pred_masks[key].update(slices)

    def _write(self, trainer: Any) -> None:
        self._hold(trainer, None)
        self._gather(trainer)
        output_dir = self.output_dir or Path(trainer.default_root_dir) / "volumes"
        time_point = reader_of(getattr(trainer, "datamodule", None)).time_point
        used: dict[str, str] = {}
        scans = 0
        if trainer.is_global_zero:
            self._write_dicom(output_dir)
        for (source, axis), slices in self._maps.items():
            if axis == "frame":  # DICOM: written above
                continue
            stem = file_key(source)
            if used.setdefault(stem, source) != source:  # same name in another folder
                stem = f"{Path(source).parent.name}_{stem}"
            if trainer.is_global_zero:
                path = nifti.write_volume(slices, source, output_dir / f"{stem}_anomaly_map.nii.gz", axis, time_point)
                self.written.append(path)
                scans += 1
                if self.masks and (source, axis) in self._pred_masks:
                    path = nifti.write_volume(
                        self._pred_masks[source, axis],
                        source,
                        output_dir / f"{stem}_pred_mask.nii.gz",
                        axis,
                        time_point,
                        dtype=np.uint8,
                    )
                    self.written.append(path)
        if scans:
            masks = " and predicted masks" if self.masks and self._pred_masks else ""
            logger.info("Wrote the anomaly maps%s of %d scan(s) as volumes to '%s'.", masks, scans, output_dir)
        self._maps.clear()
        self._pred_masks.clear()

    def _write_dicom(self, output_dir: Path) -> None:
        """Write a Segmentation and a Parametric Map of every scored DICOM series; name those that cannot be."""
        files = {source: slices for (source, axis), slices in self._maps.items() if axis == "frame"}
        if not files:
            return
        volumes, reasons = dicom_volumes(files)
        series = 0
        for uid, members in volumes.items():
            maps = np.stack([self._maps[str(path), "frame"][frame] for path, frame in members])
            masks = None
            if self.masks and all((str(path), "frame") in self._pred_masks for path, _ in members):
                masks = np.stack([self._pred_masks[str(path), "frame"][frame] for path, frame in members])
            sources = list(dict.fromkeys(path for path, _ in members))  # a multi-frame file once
            try:
                self.written += write_series_results(sources, maps, masks, output_dir, uid)
                series += 1
            except (MvfaInputError, OSError) as error:
                reasons[uid] = str(error)
        if series:
            logger.info("Wrote the DICOM results of %d series to '%s'.", series, output_dir)
        self.not_written.update(reasons)
        for name, reason in list(reasons.items())[:LISTED_REASONS]:
            logger.warning("VolumeMapWriter: no DICOM results for '%s': %s", name, reason)
        if len(reasons) > LISTED_REASONS:
            logger.warning(
                "VolumeMapWriter: and no DICOM results for %d more file(s) or series (VolumeMapWriter.not_written "
                "names each with its reason).",
                len(reasons) - LISTED_REASONS,
            )

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the volumes."""
        del pl_module
        self._write(trainer)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the volumes."""
        del pl_module
        self._write(trainer)


def dicom_volumes(files: dict[str, dict[int, Any]]) -> tuple[dict[str, list[tuple[Path, int]]], dict[str, str]]:
    """The scored DICOM files as volumes: ``{series UID: [(file, frame), ...]}`` in anatomical order.

    Single-frame files are grouped by series (:func:`~anomalib_mvfa.data.series.group_series`); a
    multi-frame file is a volume of its frames. Returns the volumes and ``{file or series: reason}``
    for the files that belong to none (no series UID, no geometry, a series that mixes geometries).
    """
    headers = {header.path: header for header in dicom_headers(files)}
    reasons = {name: "its header cannot be read" for name in files if Path(name) not in headers}
    volumes: dict[str, list[tuple[Path, int]]] = {}
    try:
        series = group_series(header for header in headers.values() if header.frames == 1)
    except MvfaInputError as error:
        return volumes, {**reasons, "series": str(error)}
    for uid, ordered in series.items():
        volumes[uid] = [(header.path, 0) for header in ordered]
    grouped = {header.path for ordered in series.values() for header in ordered}
    for path, header in headers.items():
        if header.series_uid is None:
            reasons[str(path)] = "it has no SeriesInstanceUID, which a DICOM result must reference"
        elif header.frames > 1:
            key = header.series_uid if header.series_uid not in volumes else f"{header.series_uid}_{path.stem}"
            volumes[key] = [(path, frame) for frame in sorted(files[str(path)])]
        elif path not in grouped:
            reasons[str(path)] = (
                "it states no ImagePositionPatient or ImageOrientationPatient (a projection image?): a Segmentation "
                "and a Parametric Map need the plane of every frame"
            )
    return volumes, reasons
