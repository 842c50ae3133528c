"""Few-shot memory-bank callback of MVFA.

``Mvfa`` registers this callback itself (``configure_callbacks``), with its settings. It

1. draws the K normal support images (seeded) from the datamodule's training split or from
   ``few_shot_source``, and K abnormal ones from ``abnormal_source`` (:mod:`.selection`);
2. augments them into MVFA's 11 variants and tells the model what it trains on
   (``model.train_on``, a :class:`~.datasets.TrainingSet`): anomalib's training split of normal
   images is not what MVFA trains on;
3. builds the memory banks and the calibration with the trained adapters before each
   validation, test and prediction that needs them;
4. logs the selected files, writes them to ``support_set.json`` in the run folder, keeps
   them in checkpoints, and writes the adapters in the authors' layout after training.

The seam is one-way: the callback knows its settings and four members of the model
(:class:`SupportedModel`); the model never looks at the callback or the datamodule's loaders.
The user's datamodule is never modified: the model serves the training set from its own
``train_dataloader`` hook for the fit it was told about.

Example:
    >>> from anomalib_mvfa import Mvfa
    >>> model = Mvfa(k_shot=4)  # doctest: +SKIP
    >>> [type(c).__name__ for c in model.configure_callbacks()]  # doctest: +SKIP
    ['PreProcessor', 'PostProcessor', 'Evaluator', 'MvfaVisualizer', 'FewShotMemoryBankCallback', 'ResumeCheckpoint']
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from ..data.validation import check_split_files
from ..errors import MvfaInputError
from ..utils import write_atomically
from .augmentation import augment_support_set
from .datasets import TrainingSet, support_training_set, zero_shot_training_set
from .selection import SupportImages, SupportSettings, draw_abnormal, draw_normal, shares_test_images

__all__ = ["ADAPTER_FILE", "SUPPORT_RECORD", "FewShotMemoryBankCallback", "SupportedModel"]

logger = logging.getLogger(__name__)

SUPPORT_RECORD = "support_set.json"
ADAPTER_FILE = Path("weights") / "mvfa_adapters.pth"


@runtime_checkable
class SupportedModel(Protocol):
    """What the callback needs of the model it serves."""

    @property
    def has_memory_bank(self) -> bool:
        """Whether memory banks exist (built, or restored from a checkpoint)."""

    def train_on(self, training_set: TrainingSet) -> None:
        """Train on ``training_set`` in the fit that is starting."""

    def build_memory_bank(self, images: torch.Tensor, groups: torch.Tensor) -> None:
        """Build memory banks and calibration from normal ``[0, 1]`` images with the current adapters."""

    def save_adapters(self, path: str | Path) -> Path:
        """Write the adapters alone, in the authors' layout."""


class FewShotMemoryBankCallback(Callback):
    """Select, augment and serve MVFA's support set; build memory banks with trained adapters.

    Args:
        k_shot: Normal support images (and as many abnormal ones); 0: zero-shot (no memory bank).
        seed: Seed of the draws, the synthetic anomalies and the shuffling.
        image_size: Side of the support images.
        abnormal_source: ``"auto"``, ``"synthetic"``, ``"validation"``, ``"train"`` or a folder
            (see :class:`~anomalib_mvfa.Mvfa`); checked when a fit starts.
        few_shot_source: Folder of normal support images instead of the training split.
        batch_size: Support images per optimisation step.
        train_adapters: Whether fits train the adapters (``epochs > 0``).
        feature_pipeline: Recorded in ``support_set.json``.

    Example:
        >>> callback = FewShotMemoryBankCallback(k_shot=2, seed=1, image_size=64)
        >>> callback.settings.abnormal_source
        'auto'
    """

    def __init__(
        self,
        k_shot: int = 4,
        seed: int = 0,
        image_size: int = 240,
        abnormal_source: str = "auto",
        few_shot_source: str | None = None,
        batch_size: int = 1,
        train_adapters: bool = True,
        feature_pipeline: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = SupportSettings(
            k_shot=k_shot,
            seed=seed,
            image_size=image_size,
            abnormal_source=abnormal_source,
            few_shot_source=few_shot_source,
            batch_size=batch_size,
            train_adapters=train_adapters,
            feature_pipeline=feature_pipeline,
        )
        self.normal: SupportImages | None = None
        self.selected_files: dict[str, list[str]] = {}
        self._bank_step: int | None = None
        self._checked_stages: set[str] = set()

    # ------------------------------------------------------------ fit stage

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the files of the splits the run uses; before a training fit, tell the model its training set."""
        self._check_files(trainer, stage)
        if stage != TrainerFn.FITTING or not self.settings.train_adapters:
            return
        model = self._supported(pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            msg = "Mvfa trains through a datamodule: pass `datamodule=` to Engine.fit/Engine.train."
            raise MvfaInputError(msg)
        settings = self.settings
        if settings.k_shot == 0:
            training_set = zero_shot_training_set(datamodule, settings.image_size, settings.batch_size, settings.seed)
            if training_set.class_names:
                self.selected_files["zero_shot_training"] = training_set.class_names
        else:
            self.normal = draw_normal(settings, datamodule)
            abnormal = draw_abnormal(settings, self.normal, datamodule)
            self.selected_files = {"normal": self.normal.sources, "abnormal": abnormal.sources}
            self._record(trainer)
            training_set = support_training_set(self.normal, abnormal, settings.batch_size, settings.seed)
        model.train_on(training_set)

    @staticmethod
    def _supported(pl_module: LightningModule) -> SupportedModel:
        if not isinstance(pl_module, SupportedModel):
            msg = (
                f"FewShotMemoryBankCallback serves models with train_on, has_memory_bank, build_memory_bank and "
                f"save_adapters (such as anomalib_mvfa.Mvfa), not {type(pl_module).__name__}."
            )
            raise TypeError(msg)
        return pl_module

    def _record(self, trainer: Trainer) -> None:
        settings = self.settings
        record = {
            "seed": settings.seed,
            "k_shot": settings.k_shot,
            "feature_pipeline": settings.feature_pipeline,
            **self.selected_files,
        }
        if not trainer.is_global_zero:  # every process drew the same files; one writes them
            return
        path = Path(trainer.default_root_dir) / SUPPORT_RECORD
        write_atomically(path, lambda name: Path(name).write_text(json.dumps(record, indent=2)))
        logger.info("MVFA support selection written to %s", path)

    def _check_files(self, trainer: Trainer, stage: str) -> None:
        """Read the header of every image and mask of the splits this stage uses, once per stage.

        A fit checks the test split too: a bad test file found after hours of training would lose the run.
        """
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or stage in self._checked_stages:
            return
        names = {"train": "train_data", "validation": "val_data", "test": "test_data"}
        if stage == TrainerFn.TESTING:
            names = {"test": "test_data"}
        elif stage == TrainerFn.VALIDATING:
            names = {"validation": "val_data"}
        elif stage != TrainerFn.FITTING:
            return
        splits = {name: getattr(datamodule, attribute, None) for name, attribute in names.items()}
        check_split_files({name: dataset for name, dataset in splits.items() if dataset is not None})
        self._checked_stages.add(stage)

    # --------------------------------------------------------- memory banks

    def refresh_memory_bank(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build memory banks and calibration from the normal support images when needed.

        While fitting, they are rebuilt whenever the adapters have changed since the last
        build; otherwise (test, predict, validate) a memory bank restored from a checkpoint
        is kept.
        """
        if self.settings.k_shot == 0:
            return
        model = self._supported(pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if model.has_memory_bank and not (fitting and self._bank_step != trainer.global_step):
            return
        datamodule = getattr(trainer, "datamodule", None)
        if self.normal is None:
            if datamodule is None and not self.settings.few_shot_source:
                logger.warning("Mvfa has no memory bank and no support images here: scoring with the zero-shot branch.")
                return
            self.normal = draw_normal(self.settings, datamodule)
            self.selected_files["normal"] = self.normal.sources
        normal = augment_support_set(self.normal.images)
        model.build_memory_bank(normal.images, normal.groups)
        self._bank_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refresh the memory bank before validation; warn when validation images are test images."""
        datamodule = getattr(trainer, "datamodule", None)
        if shares_test_images(datamodule, getattr(datamodule, "val_data", None)):
            logger.warning(
                "The validation split shares images with the test split (val_split_mode 'same_as_test'): "
                "anomalib's threshold and normalisation are then set on test images and F1 scores are optimistic. "
                "Use --data.val_split_mode from_test for an honest evaluation."
            )
        self.refresh_memory_bank(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make sure a memory bank exists before testing."""
        self.refresh_memory_bank(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Make sure a memory bank exists before predicting."""
        self.refresh_memory_bank(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After the last epoch: memory bank from the final adapters; adapters saved alone."""
        self.refresh_memory_bank(trainer, pl_module)
        if not trainer.is_global_zero:  # DDP keeps the adapters equal on every process; one writes them
            return
        path = Path(trainer.default_root_dir) / ADAPTER_FILE
        self._supported(pl_module).save_adapters(path)
        logger.info("MVFA adapters (authors' layout) written to %s", path)

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The selected support files travel with the checkpoint."""
        return {"selected_files": self.selected_files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the record of selected support files."""
        self.selected_files = dict(state_dict.get("selected_files", {}))
