"""Few-shot memory-bank callback of MVFA.

``Mvfa`` registers this callback itself (``configure_callbacks``). It

1. draws the K normal support images (seeded) from the datamodule's training split or
   from the model's ``few_shot_source`` folder, and K abnormal ones from the model's
   ``abnormal_source``;
2. augments the support set into MVFA's 11 variants and hands it to Lightning's fit loop
   in place of the datamodule's training loader (anomalib's training split of normal
   images is not what MVFA trains on);
3. builds the memory banks and the calibration with the trained adapters before each
   validation, test and prediction that needs them;
4. logs the selected files, writes them to ``support_set.json`` in the run folder, keeps
   them in checkpoints, and writes the adapters in the authors' layout after training.

Example:
    >>> from anomalib_mvfa import Mvfa
    >>> model = Mvfa(k_shot=4)  # doctest: +SKIP
    >>> [type(c).__name__ for c in model.configure_callbacks()]  # doctest: +SKIP
    ['PreProcessor', 'PostProcessor', 'Evaluator', 'ImageVisualizer', 'FewShotMemoryBankCallback']
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, Sampler

from .augmentation import augment_support_set
from .data.validation import check_split_files
from .prompting import prompt_class_name
from .support import (
    LabelledDataset,
    SupportDataset,
    SupportImages,
    draw_from_dataset,
    draw_from_folder,
    synthesize_abnormal,
)
from .utils import write_atomically

if TYPE_CHECKING:
    from .lightning_model import Mvfa

logger = logging.getLogger(__name__)

SUPPORT_RECORD = "support_set.json"
ADAPTER_FILE = Path("weights") / "mvfa_adapters.pth"
# Seeds of the epochs' shuffles: seed * EPOCH_STRIDE + epoch (distinct for any realistic epoch count).
EPOCH_STRIDE = 1_000_003


class EpochShuffleSampler(Sampler[int]):
    """A shuffled order per epoch that depends only on the seed and the epoch number.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint
    visits the support images in the same order as an uninterrupted run. Unlike the
    ``seed + epoch`` of torch's ``DistributedSampler``, runs with neighbouring seeds do not share
    their epochs' orders.

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        """Indices in this epoch's order."""
        generator = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        """Number of indices."""
        return self.size


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every training epoch, to resume an interrupted fit with ``--ckpt_path``.

    anomalib's own checkpoint (``model.ckpt``) is written only after the last epoch's validation.
    """

    def __init__(self) -> None:
        super().__init__(filename="last", enable_version_counter=False, save_on_train_epoch_end=True)

    @property
    def state_key(self) -> str:
        """Distinct from anomalib's checkpoint callback in the checkpoint's callback states."""
        return "MvfaResumeCheckpoint"


def test_overlap(datamodule: Any, dataset: Any) -> bool:
    """Whether ``dataset`` shares image files with the datamodule's test split."""
    test_data = getattr(datamodule, "test_data", None)
    if test_data is None or dataset is None:
        return False
    return not set(dataset.samples.image_path).isdisjoint(test_data.samples.image_path)


class FewShotMemoryBankCallback(Callback):
    """Select, augment and serve MVFA's support set; build memory banks with trained adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.normal: SupportImages | None = None
        self.abnormal: SupportImages | None = None
        self.selected_files: dict[str, list[str]] = {}
        self._bank_step: int | None = None
        self._checked_stages: set[str] = set()
        self._patched_datamodule: Any = None

    # ------------------------------------------------------------- selection

    def select_support(self, trainer: Trainer, model: Mvfa) -> None:
        """Draw the normal (and, for training, abnormal) support images once per callback."""
        if self.normal is not None:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if model.few_shot_source:
            self.normal = draw_from_folder(model.few_shot_source, model.k_shot, model.seed, model.image_size)
        elif datamodule is not None and getattr(datamodule, "train_data", None) is not None:
            self.normal = draw_from_dataset(
                datamodule.train_data,
                0,
                model.k_shot,
                model.seed,
                model.image_size,
                "The training split",
                files=self._fixed_files(datamodule, model, "normal"),
            )
        else:
            msg = (
                "Mvfa needs normal support images: give the trainer a datamodule with a training split, "
                "or set few_shot_source to a folder of normal images."
            )
            raise ValueError(msg)
        self.selected_files["normal"] = self.normal.sources
        logger.info("MVFA normal support images (seed %d): %s", model.seed, self.normal.sources)

    def select_abnormal(self, trainer: Trainer, model: Mvfa) -> None:
        """Draw or synthesise the K abnormal support images from ``model.abnormal_source``."""
        if self.abnormal is not None:
            return
        datamodule = getattr(trainer, "datamodule", None)
        source = model.resolve_abnormal_source(datamodule)
        if source == "synthetic":
            self.abnormal = synthesize_abnormal(self.normal, model.seed)
        elif source in {"validation", "train"}:
            split = "val_data" if source == "validation" else "train_data"
            dataset = getattr(datamodule, split, None)
            if dataset is None:
                msg = f"abnormal_source='{source}' needs a datamodule with a {split} split; none was found."
                raise ValueError(msg)
            if test_overlap(datamodule, dataset):
                msg = (
                    f"abnormal_source='{source}' would draw support images from the test split: the datamodule's "
                    f"{split} shares images with test_data (anomalib's val_split_mode 'same_as_test' does this). "
                    "Use a disjoint validation split, for example --data.val_split_mode from_test."
                )
                raise ValueError(msg)
            name = "The validation split" if source == "validation" else "The training split"
            files = self._fixed_files(datamodule, model, "abnormal")
            self.abnormal = draw_from_dataset(dataset, 1, model.k_shot, model.seed, model.image_size, name, files)
        else:
            self.abnormal = draw_from_folder(source, model.k_shot, model.seed, model.image_size, label=1)
        self.selected_files["abnormal"] = self.abnormal.sources
        logger.info("MVFA abnormal support images (%s): %s", source, self.abnormal.sources)

    @staticmethod
    def _fixed_files(datamodule: Any, model: Mvfa, kind: str) -> list[str] | None:
        """Files a datamodule's seed file fixes for the model's seed (``MedicalAD(seed_file=...)``)."""
        support_files = getattr(datamodule, "support_files", None)
        if not callable(support_files):
            return None
        if "k_shot" in inspect.signature(support_files).parameters:
            fixed = support_files(model.seed, k_shot=model.k_shot, kinds=(kind,))
        else:
            fixed = support_files(model.seed)
        return None if fixed is None else fixed[kind]

    def _record(self, trainer: Trainer, model: Mvfa) -> None:
        record = {
            "seed": model.seed,
            "k_shot": model.k_shot,
            "feature_pipeline": model.feature_pipeline.value,
            **self.selected_files,
        }
        path = Path(trainer.default_root_dir) / SUPPORT_RECORD
        write_atomically(path, lambda name: Path(name).write_text(json.dumps(record, indent=2)))
        logger.info("MVFA support selection written to %s", path)

    # ------------------------------------------------------------ fit stage

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the files of the splits the run uses; before fitting, select and serve the support set."""
        self._check_files(trainer, stage)
        if stage != TrainerFn.FITTING or not pl_module.trains_adapters:
            return
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            msg = "Mvfa trains through a datamodule: pass `datamodule=` to Engine.fit/Engine.train."
            raise ValueError(msg)
        if pl_module.k_shot == 0:
            self._serve(datamodule, self._zero_shot_training_data(datamodule, pl_module), pl_module)
            return
        self.select_support(trainer, pl_module)
        self.select_abnormal(trainer, pl_module)
        self._record(trainer, pl_module)
        support = SupportImages.concatenate([self.normal, self.abnormal])
        if not self.abnormal.has_mask.any():
            # As in MVFA, without abnormal masks the segmentation loss is left out for all images:
            # all-zero targets of normal images alone would teach the maps to see nothing.
            support.has_mask = torch.zeros_like(support.has_mask)
            logger.info("MVFA abnormal support images have no masks: only the detection loss is trained.")
        self._serve(datamodule, SupportDataset(support), pl_module)

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

    def _zero_shot_training_data(self, datamodule: Any, model: Mvfa) -> LabelledDataset:
        """Labelled images of the training split, each with its own category's prompts."""
        samples = datamodule.train_data.samples
        if "category" in samples:
            categories = sorted(set(samples["category"]))
            prompt_name = getattr(datamodule, "prompt_name", prompt_class_name)
            names = [prompt_name(category) for category in categories]
        else:
            categories = names = [model.resolve_class_name()]
        model.set_training_prompts(names)
        self.selected_files["zero_shot_training"] = [f"{c}: {n}" for c, n in zip(categories, names, strict=True)]
        logger.info("MVFA zero-shot training on %d labelled images of %s.", len(samples), categories)
        return LabelledDataset(datamodule.train_data, model.image_size, categories)

    def _serve(self, datamodule: Any, dataset: Dataset, model: Mvfa) -> None:
        """Make ``dataset`` the training data of this fit (restored in teardown).

        anomalib's Engine hands the trainer the datamodule; MVFA's fit loop must iterate over the
        augmented support set (or the labelled zero-shot images) instead of the training split,
        so the datamodule serves it for this run.
        """
        loader = DataLoader(
            dataset,
            batch_size=model.batch_size,
            sampler=EpochShuffleSampler(len(dataset), model.seed),
            collate_fn=SupportDataset.collate,
        )
        datamodule.train_dataloader = lambda: loader
        self._patched_datamodule = datamodule

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the datamodule its own training loader back."""
        del trainer, pl_module, stage
        self._restore_datamodule()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A fit that raises (or is interrupted) skips ``teardown``: give the datamodule its loader back here."""
        del trainer, pl_module, exception
        self._restore_datamodule()

    def _restore_datamodule(self) -> None:
        if self._patched_datamodule is not None:
            vars(self._patched_datamodule).pop("train_dataloader", None)
            self._patched_datamodule = None

    # --------------------------------------------------------- memory banks

    def refresh_memory_bank(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Build memory banks and calibration from the normal support images when needed.

        While fitting, they are rebuilt whenever the adapters have changed since the last
        build; otherwise (test, predict, validate) a memory bank restored from a checkpoint
        is kept.
        """
        model: Mvfa = pl_module
        if model.k_shot == 0:
            return
        fitting = trainer.state.fn == TrainerFn.FITTING
        if model.model.has_memory_bank and not (fitting and self._bank_step != trainer.global_step):
            return
        if self.normal is None and getattr(trainer, "datamodule", None) is None and not model.few_shot_source:
            logger.warning("Mvfa has no memory bank and no support images here: scoring with the zero-shot branch.")
            return
        self.select_support(trainer, model)
        normal = augment_support_set(self.normal.images)
        model.build_memory_bank(normal.images, normal.groups)
        self._bank_step = trainer.global_step

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refresh the memory bank before validation; warn when validation images are test images."""
        datamodule = getattr(trainer, "datamodule", None)
        if test_overlap(datamodule, getattr(datamodule, "val_data", None)):
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
        path = Path(trainer.default_root_dir) / ADAPTER_FILE
        pl_module.model.save_adapters(path)
        logger.info("MVFA adapters (authors' layout) written to %s", path)

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The selected support files travel with the checkpoint."""
        return {"selected_files": self.selected_files}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the record of selected support files."""
        self.selected_files = dict(state_dict.get("selected_files", {}))
