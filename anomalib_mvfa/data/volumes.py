"""Anomaly maps of NIfTI slices written back as volumes over their scans.

:class:`VolumeMapWriter` is a Lightning callback: during ``test`` or ``predict`` it collects the
anomaly map (and predicted mask) of every NIfTI slice, resized to the slice's own size, and at
the end writes one volume per scan with the scan's grid, affine and header
(:func:`~anomalib_mvfa.data.nifti.write_volume`): ``<scan>_anomaly_map.nii.gz`` (float32, the
model's normalised scores) and ``<scan>_pred_mask.nii.gz`` (uint8). They open over the scan in
3D Slicer or ITK-SNAP. Slices that were not scored (``skip_empty_slices``) are 0. Under DDP
the processes' slices are gathered and the first process writes the volumes.

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

from . import nifti
from .datasets import file_key
from .readers import SampleName, file_format, reader_of

logger = logging.getLogger(__name__)


class VolumeMapWriter(Callback):
    """Write the anomaly maps (and predicted masks) of NIfTI slices as volumes (module docstring).

    Args:
        output_dir: Folder of the volumes; ``<default_root_dir>/volumes`` when ``None``.
        masks: Write the predicted masks too.
    """

    def __init__(self, output_dir: str | Path | None = None, masks: bool = True) -> None:
        super().__init__()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.masks = masks
        self._maps: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
        self._pred_masks: dict[tuple[str, str], dict[int, np.ndarray]] = defaultdict(dict)
        self.written: list[Path] = []
        self._pending: list[Any] = []
        self._skipped: set[str] = set()  # DICOM files scored here: their maps are images, not volumes

    def _collect(self, trainer: Any, outputs: Any) -> None:
        names = getattr(outputs, "image_path", None) or []
        maps = getattr(outputs, "anomaly_map", None)
        pred_masks = getattr(outputs, "pred_mask", None)
        if maps is None:
            return
        time_point = reader_of(getattr(trainer, "datamodule", None)).time_point
        for position, name in enumerate(names):
            sample = SampleName.parse(name)
            if sample.part not in nifti.SLICE_AXES or file_format(sample.file) != "nifti":
                if file_format(sample.file) == "dicom":
                    self._skipped.add(str(sample.file))
                continue
            shape = nifti.canonical_shape(sample.file, time_point)
            kept = [size for axis, size in enumerate(shape) if axis != nifti.SLICE_AXES[sample.part]]
            size = (kept[1], kept[0])  # the slice as shown: rows, columns
            key = (str(sample.file), sample.part)
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
        for (source, axis), slices in self._maps.items():
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
        if self._skipped and trainer.is_global_zero:
            logger.warning(
                "VolumeMapWriter writes volumes of NIfTI scans only: the %d DICOM file(s) scored here get no volume "
                "(their maps are the prediction images).",
                len(self._skipped),
            )
        self._maps.clear()
        self._pred_masks.clear()
        self._skipped.clear()

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the volumes."""
        del pl_module
        self._write(trainer)

    def on_predict_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the volumes."""
        del pl_module
        self._write(trainer)
