"""The run folder of an ``Mvfa`` run: one for all processes, every file in it whole or not at all.

:class:`RunFiles` is the callback ``Mvfa`` registers for its run folder (``trainer.default_root_dir``):

- at every stage's setup, under DDP, every process takes the first process's run folder
  (:func:`~anomalib_mvfa.distributed.share_run_folder`), and the trainer's default checkpoint writer
  (Lightning's or anomalib's) becomes :class:`~anomalib_mvfa.utils.AtomicCheckpointIO`, so that
  ``model.ckpt`` and ``last.ckpt`` appear whole or not at all (a writer of the user's own is left);
- when a fit that drew a few-shot support set starts, the first process writes ``support_set.json``
  (seed, K, feature pipeline and the selected files);
- after training, the first process writes the adapters in the authors' layout to
  ``weights/mvfa_adapters.pth``.

Exports are atomic too: ``Mvfa.to_torch``, ``to_onnx`` and ``to_openvino`` run through
:func:`~anomalib_mvfa.utils.export_atomically`.

Example:
    >>> [type(c).__name__ for c in Mvfa(k_shot=4).configure_callbacks()]  # doctest: +SKIP
    [..., 'FewShotMemoryBankCallback', 'RunFiles', 'QuietFrozenClip', 'ResumeCheckpoint']
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, Trainer

from .distributed import share_run_folder
from .support import ADAPTER_FILE, SUPPORT_RECORD
from .utils import AtomicCheckpointIO, write_atomically

if TYPE_CHECKING:
    from .lightning_model import Mvfa

__all__ = ["RunFiles"]

logger = logging.getLogger(__name__)

# The checkpoint writers replaced by the atomic one: Lightning's default and anomalib's.
DEFAULT_CHECKPOINT_WRITERS = (TorchCheckpointIO, AnomalibCheckpointIO)


class RunFiles(Callback):
    """One run folder for all processes; atomic checkpoints; the support record and the adapter file.

    Example:
        >>> RunFiles().state_dict()  # nothing in checkpoints
        {}
    """

    def setup(self, trainer: Trainer, pl_module: Mvfa, stage: str) -> None:
        """Share the first process's run folder; write checkpoints atomically."""
        del pl_module, stage
        share_run_folder(trainer)
        strategy = trainer.strategy
        writer = strategy.checkpoint_io
        if type(writer) in DEFAULT_CHECKPOINT_WRITERS:
            strategy.checkpoint_io = AtomicCheckpointIO(extra_safe_globals=getattr(writer, "extra_safe_globals", None))

    def on_fit_start(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """Write ``support_set.json`` when this fit drew a few-shot support set (every process drew the same)."""
        record = pl_module.support.take_record(pl_module.feature_pipeline.value)
        if record is None or not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / SUPPORT_RECORD
        write_atomically(path, lambda name: Path(name).write_text(json.dumps(record, indent=2)))
        logger.info("MVFA support selection written to %s", path)

    def on_train_end(self, trainer: Trainer, pl_module: Mvfa) -> None:
        """Write the trained adapters alone, in the authors' layout (DDP keeps them equal; one process writes)."""
        if not trainer.is_global_zero:
            return
        path = Path(trainer.default_root_dir) / ADAPTER_FILE
        pl_module.save_adapters(path)
        logger.info("MVFA adapters (authors' layout) written to %s", path)
