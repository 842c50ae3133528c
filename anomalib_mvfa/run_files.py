"""The run folder of an ``Mvfa`` run: one for all processes, every file in it whole or not at all.

:class:`RunFiles` is the callback ``Mvfa`` registers for its run folder (``trainer.default_root_dir``):

- at every stage's setup, under DDP, every process takes the first process's run folder
  (:func:`~anomalib_mvfa.distributed.share_run_folder`), and the trainer's default checkpoint writer
  (Lightning's or anomalib's) becomes :class:`~anomalib_mvfa.utils.AtomicCheckpointIO`, so that
  ``model.ckpt`` and ``last.ckpt`` appear whole or not at all (a writer of the user's own is left);
- when a fit that drew a few-shot support set starts, the first process writes ``support_set.json``
  (seed, K, feature pipeline and the selected files);
- after training, the first process writes the adapters in the authors' layout to
  ``weights/mvfa_adapters.pth``;
- resuming a fit from a checkpoint of a finished run (all its epochs trained) says so and writes
  nothing: the version folder anomalib's Engine made for it is removed, and ``latest`` and the run
  folder are those of the checkpoint's run again (:meth:`RunFiles.on_fit_end`);
- an export of a model loaded from a run's checkpoint goes into that run's folder when the export
  root holds the run (as anomalib's default root does), not into one shared ``weights/<type>`` folder
  (:func:`export_folder`);
- a prediction through anomalib's Engine gets a run folder of its own (``v<N>``, with ``latest`` a link
  to it, as training makes), not the ``latest`` folder of another run (:func:`own_prediction_folder`),
  and leaves :data:`PREDICTIONS_TABLE` there: one row per image with its file, its study (the volume
  it is a slice of: a NIfTI file, a DICOM series) and slice, score, decision and the file of its
  anomaly map picture.

Exports are atomic too: ``Mvfa.to_torch``, ``to_onnx`` and ``to_openvino`` run through
:func:`~anomalib_mvfa.utils.export_atomically`.

Example:
    >>> [type(c).__name__ for c in Mvfa(k_shot=4).configure_callbacks()]  # doctest: +SKIP
    [..., 'FewShotMemoryBankCallback', 'RunFiles', 'QuietFrozenClip', 'ResumeCheckpoint']
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from anomalib.utils.path import create_versioned_dir
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from ._compat import set_default_root_dir
from .data.datasets import sample_identity
from .distributed import share_run_folder
from .support import ADAPTER_FILE, SUPPORT_RECORD
from .utils import AtomicCheckpointIO, write_atomically, write_rows

if TYPE_CHECKING:
    from .lightning_model import Mvfa

__all__ = ["PREDICTIONS_TABLE", "RunFiles", "export_folder", "own_prediction_folder"]

logger = logging.getLogger(__name__)

# The table of a prediction's images, in its run folder.
PREDICTIONS_TABLE = "predictions.csv"
# Folders anomalib's Engine runs in: a version folder, or the ``latest`` link to one.
ENGINE_RUN_FOLDER = re.compile(r"v\d+|latest")
# The checkpoint writers replaced by the atomic one: Lightning's default and anomalib's.
DEFAULT_CHECKPOINT_WRITERS = (TorchCheckpointIO, AnomalibCheckpointIO)


class RunFiles(Callback):
    """One run folder for all processes; atomic checkpoints; the support record and the adapter file.

    Example:
        >>> RunFiles().state_dict()  # nothing in checkpoints
        {}
    """

    def __init__(self) -> None:
        self.predictions: list[dict[str, Any]] = []
        self._identities: dict[str, Any] | None = None  # study and slice of each prediction sample
        self.finished_run = False  # this fit resumes a run that trained all its epochs

    def on_load_checkpoint(self, trainer: Trainer, pl_module: Mvfa, checkpoint: dict[str, Any]) -> None:
        """Note (and say) when the fit resumes a checkpoint that trained all its epochs: there is nothing to do."""
        self.finished_run = checkpoint.get("epoch", -1) + 1 >= pl_module.epochs
        if self.finished_run:
            logger.warning(
                "Checkpoint %s finished its run (%d of %d epoch(s) trained): there is nothing to resume and no "
                "file is written. Pass a larger --model.epochs to train it further.",
                trainer.ckpt_path, checkpoint.get("epoch", -1) + 1, pl_module.epochs,
            )  # fmt: skip

    def setup(self, trainer: Trainer, pl_module: Mvfa, stage: str) -> None:
        """A prediction's own run folder; share the first process's run folder; write checkpoints atomically."""
        if stage == TrainerFn.PREDICTING:
            own_prediction_folder(trainer)
            self.predictions = []
            self._identities = None
        share_run_folder(trainer)
        pictures = getattr(pl_module.visualizer, "output_dir", None)  # set by an earlier run of this model
        if pictures is not None and ENGINE_RUN_FOLDER.fullmatch(Path(pictures).parent.name):
            pl_module.visualizer.output_dir = None  # the visualizer takes this run's folder
        strategy = trainer.strategy
        writer = strategy.checkpoint_io
        if type(writer) in DEFAULT_CHECKPOINT_WRITERS:
            strategy.checkpoint_io = AtomicCheckpointIO(extra_safe_globals=getattr(writer, "extra_safe_globals", None))

    def on_fit_start(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """Write ``support_set.json`` when this fit drew a few-shot support set (every process drew the same)."""
        record = pl_module.support.take_record(pl_module.feature_pipeline.value)
        if record is None or not trainer.is_global_zero or self.finished_run:
            return
        path = Path(trainer.default_root_dir) / SUPPORT_RECORD
        write_atomically(path, lambda name: Path(name).write_text(json.dumps(record, indent=2)))
        logger.info("MVFA support selection written to %s", path)

    def on_train_end(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """Write the trained adapters alone, in the authors' layout (DDP keeps them equal; one process writes)."""
        if not trainer.is_global_zero or self.finished_run:
            return
        path = Path(trainer.default_root_dir) / ADAPTER_FILE
        pl_module.save_adapters(path)
        logger.info("MVFA adapters (authors' layout) written to %s", path)

    def on_fit_end(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """After resuming a finished run: remove the empty version folder made for it; the run's own is back."""
        del pl_module
        finished, self.finished_run = self.finished_run, False
        if not finished or not trainer.is_global_zero or trainer.ckpt_path is None:
            return
        made = Path(trainer.default_root_dir).resolve()
        run = next((f for f in Path(trainer.ckpt_path).resolve().parents if f.parent == made.parent), None)
        if run is None or run == made or any(path.is_file() for path in made.rglob("*")):
            return
        for folder in sorted((path for path in made.rglob("*") if path.is_dir()), reverse=True):
            folder.rmdir()
        made.rmdir()
        latest = made.parent / "latest"
        if latest.is_symlink():
            latest.unlink()
            latest.symlink_to(run, target_is_directory=True)
        set_default_root_dir(trainer, str(run))

    def on_predict_batch_end(self, trainer: Trainer, pl_module: Mvfa, outputs: Any, *args: Any, **kwargs: Any) -> None:
        """Keep each image's row of the predictions table (the post-processor has normalised the batch)."""
        del args, kwargs
        names = getattr(outputs, "image_path", None)
        if not names or outputs.pred_score is None:
            return
        visualizer = pl_module.visualizer
        labels = outputs.pred_label if outputs.pred_label is not None else [None] * len(names)
        if self._identities is None:
            self._identities = prediction_identities(trainer)
        for name, score, label in zip(names, outputs.pred_score.tolist(), labels, strict=True):
            picture = visualizer.image_file(trainer, str(name)) if hasattr(visualizer, "image_file") else ""
            decision = "" if label is None else int(label)
            study, index = self._identities.get(str(name)) or sample_identity(name)
            self.predictions.append(
                {"file": str(name), "study": study, "slice": index, "score": score, "decision": decision,
                 "map_file": picture}
            )  # fmt: skip

    def on_predict_end(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """Write the predictions table of this process's images (each process its own under DDP)."""
        del pl_module
        if not self.predictions:
            return
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        path = Path(trainer.default_root_dir) / f"{Path(PREDICTIONS_TABLE).stem}{suffix}.csv"
        rows, self.predictions = self.predictions, []
        write_rows(path, rows)
        logger.info("Mvfa predictions of %d image(s) written to %s", len(rows), path)


def prediction_identities(trainer: Trainer) -> dict[str, Any]:
    """The study and slice of each sample of the trainer's prediction datasets that know them (``ScanFolder``'s)."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
    identities: dict[str, Any] = {}
    for loader in loaders:
        identities.update(getattr(getattr(loader, "dataset", None), "identities", None) or {})
    return identities


def own_prediction_folder(trainer: Trainer) -> None:
    """Give a prediction run by anomalib's Engine a version folder of its own, ``latest`` a link to it.

    anomalib's Engine predicts in the folder ``latest`` points to (another run's), or makes ``latest``
    a plain folder when there is none: that folder becomes the next version. A run folder the user
    chose (any other name) is kept.
    """
    folder = Path(trainer.default_root_dir)
    latest = folder.parent / "latest"
    if not ENGINE_RUN_FOLDER.fullmatch(folder.name) or not trainer.is_global_zero:
        return  # a folder the user chose; the other processes take the first one's (share_run_folder)
    if latest.is_dir() and not latest.is_symlink():
        # the plain folder the Engine made for a first prediction (its config.yaml already in it), or one of
        # an earlier release: it becomes the next version, and ``latest`` a link to it
        versions = [int(path.name[1:]) for path in folder.parent.glob("v*") if re.fullmatch(r"v\d+", path.name)]
        version = folder.parent / f"v{max(versions, default=-1) + 1}"
        latest.rename(version)
        latest.symlink_to(version.resolve(), target_is_directory=True)
        set_default_root_dir(trainer, str(version.resolve()))
        return
    set_default_root_dir(trainer, str(create_versioned_dir(folder.parent)))


def export_folder(checkpoint: str | Path | None, export_root: str | Path) -> Path:
    """Where an export goes: the run folder of ``checkpoint`` when ``export_root`` holds it, else ``export_root``.

    anomalib's Engine exports under its root folder (``results``) unless told otherwise, so that the
    exports of every run would share ``results/weights/<type>``; a model loaded from the checkpoint of
    a run below that root exports into the run's folder instead.

    Example:
        >>> export_folder("results/Mvfa/MVTecAD/bottle/v2/weights/lightning/model.ckpt", "results").parts[-2:]
        ('bottle', 'v2')
        >>> export_folder(None, "exports")
        PosixPath('exports')
    """
    if checkpoint is None:
        return Path(export_root)
    resolved = Path(checkpoint).resolve()
    run = next((folder for folder in resolved.parents if ENGINE_RUN_FOLDER.fullmatch(folder.name)), None)
    root = Path(export_root).resolve()
    if run is None or root not in run.parents:
        return Path(export_root)
    logger.info("Mvfa exports into the folder of the checkpoint's run, %s.", run)
    return run
