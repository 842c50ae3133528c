"""MVFA's support set as a service of the model: drawn from one settings object, served top-down.

:class:`FewShotSupport` is owned by :class:`~anomalib_mvfa.Mvfa`, which calls it from its own hooks:

1. at a fit's setup, :meth:`FewShotSupport.training_set` draws the K normal support images (seeded)
   from the datamodule's training split or from ``few_shot_source`` and K abnormal ones from
   ``abnormal_source`` (:mod:`.selection`), augments them into MVFA's 11 variants and returns what
   the fit trains on (a :class:`~.datasets.TrainingSet`; zero-shot: the labelled training split);
2. before each validation, test and prediction, :meth:`FewShotSupport.memory_bank_images` gives the
   augmented normal support images when the memory banks need (re)building, else ``None``;
3. :meth:`FewShotSupport.without_support_images` leaves the support images out of a scored
   validation batch, so that anomalib's thresholds and normalisation are fitted on images the
   adapters and memory banks did not see;
4. :attr:`FewShotSupport.selected_files` is the record of the selected files that checkpoints keep
   and :meth:`FewShotSupport.take_record` what ``support_set.json`` holds.

The service knows its settings and the datamodule it is handed, never the model: answers go back
up as return values, and the model decides what to do with them.

Example:
    >>> from anomalib_mvfa.support import FewShotSupport, SupportSettings
    >>> support = FewShotSupport(SupportSettings(k_shot=2, image_size=64))
    >>> support.selected_files
    {}
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.states import TrainerFn

from ..data.validation import check_split_files
from ..errors import MvfaInputError
from .augmentation import SupportSet, augment_support_set
from .datasets import TrainingSet, support_training_set, zero_shot_training_set
from .selection import SupportImages, SupportSettings, draw_abnormal, draw_normal, shares_test_images

__all__ = ["ADAPTER_FILE", "SUPPORT_RECORD", "FewShotSupport"]

logger = logging.getLogger(__name__)

# Files of the run folder: the support record (written when a fit draws a few-shot support set)
# and the adapters in the authors' layout (written after training).
SUPPORT_RECORD = "support_set.json"
ADAPTER_FILE = Path("weights") / "mvfa_adapters.pth"
# The splits whose files a stage reads, checked once per stage (a fit checks the test split too).
STAGE_SPLITS = {
    TrainerFn.FITTING: {"train": "train_data", "validation": "val_data", "test": "test_data"},
    TrainerFn.VALIDATING: {"validation": "val_data"},
    TrainerFn.TESTING: {"test": "test_data"},
}


class FewShotSupport:
    """Select, augment and serve MVFA's support set; say when the memory banks need building.

    Args:
        settings: What the support set is drawn from and how it is served.

    Example:
        >>> support = FewShotSupport(SupportSettings(k_shot=0))
        >>> support.memory_bank_images(Trainer(logger=False), built=False) is None  # zero-shot: no bank
        True
    """

    def __init__(self, settings: SupportSettings) -> None:
        self.settings = settings
        self.normal: SupportImages | None = None
        self.selected_files: dict[str, list[str]] = {}
        self._record: dict[str, Any] | None = None
        self._bank_step: int | None = None
        self._checked_stages: set[str] = set()

    def check_files(self, datamodule: Any, stage: str) -> None:
        """Read the header of every image and mask of the splits ``stage`` uses, once per stage.

        A fit checks the test split too: a bad test file found after hours of training would lose the run.
        """
        if datamodule is None or stage in self._checked_stages or stage not in STAGE_SPLITS:
            return
        splits = {name: getattr(datamodule, attribute, None) for name, attribute in STAGE_SPLITS[stage].items()}
        check_split_files({name: dataset for name, dataset in splits.items() if dataset is not None})
        self._checked_stages.add(stage)

    def training_set(self, datamodule: Any) -> TrainingSet:
        """Draw what a fit trains on: the augmented support set, or (``k_shot=0``) the labelled training split.

        Raises:
            MvfaInputError: Without a datamodule, or if the support images cannot be drawn.
        """
        if datamodule is None:
            msg = "Mvfa trains through a datamodule: pass `datamodule=` to Engine.fit/Engine.train."
            raise MvfaInputError(msg)
        settings = self.settings
        if settings.k_shot == 0:
            training_set = zero_shot_training_set(datamodule, settings.image_size, settings.batch_size, settings.seed)
            if training_set.class_names:
                self.selected_files["zero_shot_training"] = training_set.class_names
            return training_set
        self.normal = draw_normal(settings, datamodule)
        abnormal = draw_abnormal(settings, self.normal, datamodule)
        self.selected_files = {"normal": self.normal.sources, "abnormal": abnormal.sources}
        self._record = {"seed": settings.seed, "k_shot": settings.k_shot, **self.selected_files}
        return support_training_set(self.normal, abnormal, settings.batch_size, settings.seed)

    def take_record(self, feature_pipeline: str) -> dict[str, Any] | None:
        """What ``support_set.json`` holds for the support set drawn since the last call, else ``None``."""
        record, self._record = self._record, None
        if record is None:
            return None
        seed, k_shot = record.pop("seed"), record.pop("k_shot")
        return {"seed": seed, "k_shot": k_shot, "feature_pipeline": feature_pipeline, **record}

    def without_support_images(self, batch: Batch) -> Batch:
        """``batch`` less its support images (the selected files), else ``batch`` itself; it may be left empty.

        The validation split can hold the support images (a medical ``valid`` split is the support pool): the
        memory banks score them near zero and the adapters were trained on them, so thresholds fitted on them
        would be optimistic.
        """
        support = {file for part in ("normal", "abnormal") for file in self.selected_files.get(part, [])}
        paths = [str(path) for path in getattr(batch, "image_path", None) or []]
        keep = [path not in support for path in paths]
        if not support or all(keep):
            return batch
        logger.info("%d support image(s) left out of the validation scores that fit the thresholds.", keep.count(False))
        mask, size = torch.tensor(keep), len(keep)
        changes = {}
        for field in dataclasses.fields(batch):
            value = getattr(batch, field.name)
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == size:
                changes[field.name] = value[mask.to(value.device)]
            elif isinstance(value, list) and len(value) == size:
                changes[field.name] = [each for each, kept in zip(value, keep, strict=True) if kept]
        return dataclasses.replace(batch, **changes)

    @staticmethod
    def warn_if_validation_is_test(datamodule: Any) -> None:
        """Warn when the validation split shares images with the test split."""
        if shares_test_images(datamodule, getattr(datamodule, "val_data", None)):
            logger.warning(
                "The validation split shares images with the test split (val_split_mode 'same_as_test'): "
                "anomalib's threshold and normalisation are then set on test images and F1 scores are optimistic. "
                "Use --data.val_split_mode from_test for an honest evaluation."
            )

    def memory_bank_images(self, trainer: Trainer, built: bool) -> SupportSet | None:
        """The augmented normal support images to build the memory banks from, or ``None`` to keep them.

        While fitting, the banks are rebuilt whenever the adapters have changed since the last
        build (another global step); otherwise (test, predict, validate) banks that are
        ``built`` (or restored from a checkpoint) are kept.

        Args:
            trainer: The running trainer: its stage, its global step, and its datamodule, where
                normal support images are drawn from when none were drawn yet.
            built: Whether the model holds memory banks.
        """
        if self.settings.k_shot == 0:
            return None
        step, datamodule = trainer.global_step, trainer.datamodule
        if built and not (trainer.state.fn == TrainerFn.FITTING and self._bank_step != step):
            return None
        if self.normal is None:
            if datamodule is None and not self.settings.few_shot_source:
                logger.warning("Mvfa has no memory bank and no support images here: scoring with the zero-shot branch.")
                return None
            self.normal = draw_normal(self.settings, datamodule)
            self.selected_files["normal"] = self.normal.sources
        self._bank_step = step
        return augment_support_set(self.normal.images)
