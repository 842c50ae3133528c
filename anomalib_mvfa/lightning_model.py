"""Lightning module of MVFA for anomalib.

``Mvfa`` runs MVFA like any model that ships inside anomalib: ``anomalib train --model
anomalib_mvfa.Mvfa --data ...``, the ``Engine`` API, checkpoints, export.

How training gets through anomalib's Engine: ``Engine.fit`` and ``Engine.train`` skip
``trainer.fit`` for models whose ``learning_type`` is ZERO_SHOT or FEW_SHOT. MVFA trains
its adapters in both settings, so ``Mvfa`` reports ``LearningType.ONE_CLASS`` whenever it
has epochs to train (its support set is drawn from the normal training split, the
abnormal half synthesised from it by default), and FEW_SHOT or ZERO_SHOT only when
``epochs=0`` (for example with ``adapter_checkpoint``). The optimisation then runs in
Lightning's own fit loop.

The flow reads top-down: ``Mvfa`` owns one settings object and one support set
(:class:`~anomalib_mvfa.support.FewShotSupport`) and calls it from its own hooks; the support set
draws from the datamodule; the memory banks are built by ``MvfaModel.setup``. At a fit's setup the
support set is drawn and augmented, and ``Mvfa`` serves it from its own ``train_dataloader`` hook:
it points this fit's training source at itself instead of the datamodule, which is left untouched
(its validation and test loaders serve as usual, and the next fit attaches the datamodule again).
Two Adam optimisers step in ``training_step`` (manual optimisation, :mod:`anomalib_mvfa.training`);
Lightning averages the logged losses over each epoch, and the averages are printed after each
epoch. Checkpoint contents and checks live in :mod:`anomalib_mvfa.checkpoints`, the run folder's
files in :mod:`anomalib_mvfa.run_files`.

Training-only inputs (``abnormal_source``, ``few_shot_source``, ``adapter_checkpoint``) are
read when a fit starts, never when a checkpoint is loaded: testing, prediction and export
need only the checkpoint (and the CLIP weights it names).

Settings in detail:

- ``feature_pipeline="authors"`` is what the paper measured and the authors' released adapters need:
  images in ``[0, 1]`` without CLIP's normalisation, the activation the authors' loader builds, CLS
  tokens in the memory banks. ``"clip"`` adds CLIP's normalisation to the pre-processor.
- ``abnormal_source``: ``"synthetic"`` runs anomalib's Perlin anomaly generator on the K normal
  images, its masks as targets; ``"validation"`` draws abnormal images of the datamodule's
  validation split (refused when it shares images with the test split); ``"train"`` those of the
  training split; a folder's images take their masks from its ``masks/`` subfolder (same file
  stems) and without masks train the detection adapters only; ``"auto"`` is ``"train"`` when the
  training split holds at least K abnormal images, else ``"synthetic"``. A folder is checked when a
  fit starts.
- ``search_precision="bfloat16"`` chooses the nearest neighbour with bfloat16 similarities (about
  twice as fast on CPUs with bfloat16 instructions) and computes its distance exactly.
- ``pretrained=None`` gives random CLIP weights (a warning says so); random weights stay in
  checkpoints, pretrained ones are rebuilt from ``pretrained`` (:mod:`anomalib_mvfa.checkpoints`).

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_mvfa import Mvfa
    >>> model = Mvfa(backbone="ViT-B-16", pretrained="openai", image_size=224,
    ...              feature_layers=(3, 6, 9, 12), k_shot=4, epochs=5)  # doctest: +SKIP
    >>> engine = Engine()  # doctest: +SKIP
    >>> engine.train(model, datamodule=MVTecAD(category="bottle"))  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from ._compat import redirect_loop_data
from .backbone import image_statistics
from .checkpoints import (
    adopt_checkpoint_settings,
    build_before_state_dicts,
    check_loadable,
    checkpoint_feature_pipeline,
    learning_rates,
    record_on_save,
    refresh_pre_processor,
    restore_clip_weights,
    support_settings,
    torch_model_from,
    torch_model_settings,
)
from .checks import ImageRangeCheck, check_image_range
from .data.datasets import adopt_prediction_datasets
from .distributed import EvaluationSharding, sharded_loaders_hook
from .errors import MvfaInputError
from .loss import DetectionLoss, MvfaLoss
from .memory_bank import check_memory_bank_settings
from .metrics import mvfa_evaluator
from .pipeline import FeaturePipeline, resolve_feature_pipeline
from .pre_processing import mvfa_pre_processor
from .prompting import DEFAULT_CLASS_NAME, prompt_class_name
from .run_files import RunFiles, export_folder
from .support import (
    ABNORMAL_SOURCES,
    FewShotMemoryBankCallback,
    FewShotSupport,
    SupportBatch,
    SupportSettings,
    TrainingSet,
)
from .tensor_files import check_tensor_archive
from .torch_model import MvfaModel, Scores
from .training import FitInputs, QuietFrozenClip, adapter_optimizers, epoch_summary, optimisation_step
from .utils import (
    ResumeCheckpoint,
    calibrate_on_normal_images,
    check_export_modules,
    export_atomically,
    quiet_export,
)
from .visualization import MvfaVisualizer

__all__ = ["Mvfa", "checkpoint_feature_pipeline"]

logger = logging.getLogger(__name__)


def prepared_atomic_export(export: Callable[..., Path]) -> Callable[..., Path]:
    """``export`` (one of anomalib's ``to_*`` methods) run on the prepared model, written whole or not at all.

    A missing module is named with the extra that installs it; a fallback that succeeded logs no warning.
    A model loaded from a run's checkpoint exports into that run's folder when ``export_root`` holds it.
    The adapter file and the text features are loaded first (``Mvfa.prepare``); the files are written
    in a staging folder and moved into ``export_root``, the loadable one last (:func:`export_atomically`).
    """

    @functools.wraps(export)
    def prepared_export(self: Mvfa, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        check_export_modules(export.__name__)
        export_root = export_folder(getattr(self, "checkpoint_path", None), export_root)
        self.prepare()
        if export.__name__ == "to_openvino":
            kwargs = calibrate_on_normal_images(kwargs)  # anomalib would calibrate on the validation split
        with quiet_export():
            return export_atomically(export_root, lambda root: export(self, root, *args, **kwargs))

    prepared_export.__doc__ = f"anomalib's ``{export.__name__}`` of the prepared model, written whole or not at all."
    return prepared_export


def remembering_checkpoint_path(load: classmethod) -> classmethod:
    """Anomalib's ``load_from_checkpoint``, the model remembering the file as ``checkpoint_path`` (exports use it).

    A local file's archive is checked first (:func:`~anomalib_mvfa.tensor_files.check_tensor_archive`),
    so ``Mvfa.load_from_checkpoint`` and ``anomalib export --ckpt_path`` refuse a hostile archive
    before torch's reader inflates it; tensors are read with ``weights_only=True`` unless asked otherwise.
    """
    function = load.__func__

    @functools.wraps(function)
    def load_from_checkpoint(cls: type[Mvfa], checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> Mvfa:
        if isinstance(checkpoint_path, str | Path) and "://" not in str(checkpoint_path):
            check_tensor_archive(checkpoint_path, "Checkpoint")
        kwargs.setdefault("weights_only", True)
        model = function(cls, checkpoint_path, *args, **kwargs)
        model.checkpoint_path = Path(checkpoint_path)
        return model

    return classmethod(load_from_checkpoint)


class Mvfa(AnomalibModule):
    """MVFA: multi-level visual feature adapters on a frozen CLIP, as an anomalib model.

    Args:
        backbone: open_clip model name or model-config JSON file (``"tiny-random"``: a tiny test architecture).
        pretrained: open_clip pretrained tag, weights file, or ``None`` for random CLIP weights (meaningless scores).
        image_size: Side of the square input images.
        feature_layers: 1-based blocks followed by an adapter.
        feature_pipeline: ``"authors"`` (the paper's; default) or ``"clip"`` (CLIP's documented preprocessing and
            activation), see :mod:`anomalib_mvfa.pipeline`. Unset: a loaded checkpoint's own (another is refused).
        k_shot: Normal support images (and as many abnormal ones). ``0``: zero-shot; with ``epochs > 0`` the adapters
            train on the labelled training split, each image with its own category's prompts.
        class_name: Object named in the prompts. Default: the datamodule's category, else ``"object"``.
        abnormal_source: Where the K abnormal support images come from: ``"synthetic"`` (Perlin anomalies),
            ``"validation"``, ``"train"``, a folder (masks in ``masks/``) or ``"auto"`` (see the module's notes).
        few_shot_source: Folder of normal support images instead of the training split.
        epochs: Training epochs over the augmented support set (the paper: 50). ``0`` trains nothing.
        batch_size: Support images per optimisation step (the paper: 1).
        seg_learning_rate: Adam learning rate of the segmentation adapters (default 1e-3, zero-shot 1e-4).
        det_learning_rate: Adam learning rate of the detection adapters (same defaults).
        detection_loss: ``"authors"`` (BCE-with-logits on a probability, as published) or ``"bce"`` (corrected).
        seed: Seed of the support selection, the synthetic anomalies and the shuffling.
        adapter_checkpoint: Adapters to start from (authors' layout), read later; a restored checkpoint's win.
        image_score_from_map: Image score = maximum of the fused anomaly map.
        cache_prefix: Compute the frozen blocks before the first adapter once per support image (same result).
        memory_bank_ratio: Share of support tokens kept in the memory banks (coreset); ``1.0``: the paper's search.
        search_precision: ``"float32"`` (exact) or ``"bfloat16"`` (neighbours chosen in bfloat16, distances exact).
        inference_precision: ``"float32"`` or ``"bfloat16"`` (the image encoder under bfloat16 autocast when scoring).
        pre_processor: Pre-processor, or ``True`` for the feature pipeline's (bicubic resize, exported alike).
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for image/pixel AUROC and F1 (one-class AUROCs are NaN with a reason).
        visualizer: Visualizer, or ``True`` for anomalib's, keeping the folders below the dataset root.

    Example:
        >>> model = Mvfa(backbone="tiny-random", pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=2)
        >>> model.learning_type
        <LearningType.ONE_CLASS: 'one_class'>
    """

    def __init__(
        self,
        backbone: str = "ViT-L-14-336",
        pretrained: str | None = "openai",
        image_size: int = 240,
        feature_layers: Sequence[int] = (6, 12, 18, 24),
        feature_pipeline: str | None = None,
        k_shot: int = 4,
        class_name: str | None = None,
        abnormal_source: str = "auto",
        few_shot_source: str | None = None,
        epochs: int = 50,
        batch_size: int = 1,
        seg_learning_rate: float | None = None,
        det_learning_rate: float | None = None,
        detection_loss: str = "authors",
        seed: int = 0,
        adapter_checkpoint: str | None = None,
        image_score_from_map: bool = False,
        cache_prefix: bool = True,
        memory_bank_ratio: float = 1.0,
        search_precision: str = "float32",
        inference_precision: str = "float32",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_arguments(k_shot, epochs, batch_size, abnormal_source, class_name)
        check_memory_bank_settings(memory_bank_ratio, search_precision, inference_precision)
        pipeline = resolve_feature_pipeline(feature_pipeline)
        if pre_processor is True:
            statistics = image_statistics(backbone)  # the "clip" pipeline's mean and std
            pre_processor = self.configure_pre_processor((image_size, image_size), pipeline, *statistics)
        super().__init__(
            pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator, visualizer=visualizer
        )
        self.pending_adapter_checkpoint = adapter_checkpoint or None  # read when prepared, unless a checkpoint wins
        self.support = FewShotSupport(SupportSettings())  # the one support set; its settings: apply_settings
        self.automatic_optimization = False  # two optimisers, stepped together in training_step
        self.training_set: TrainingSet | None = None  # what the current fit trains on, drawn at its setup
        self.fit_inputs: FitInputs | None = None  # what every step needs, computed when training starts
        self.evaluation_sharding = EvaluationSharding()  # served by val/test_dataloader
        self.train_seg_loss = MeanMetric(nan_strategy="disable")  # epoch mean over the images with masks
        build_before_state_dicts(self)  # a state dict written or read holds the torch model's keys
        self.apply_settings()

    def apply_settings(self) -> None:
        """Take the settings in ``hparams`` (arguments or a loaded checkpoint's); ``model`` is built on first use."""
        settings = self.hparams
        pipeline = resolve_feature_pipeline(settings["feature_pipeline"])
        self.requested_feature_pipeline = None if settings["feature_pipeline"] is None else pipeline  # None: a ckpt's
        self.image_statistics = image_statistics(settings["backbone"])  # the "clip" pipeline's mean and std
        self.support.settings = support_settings(settings)
        self.loss = MvfaLoss(detection_loss=DetectionLoss(settings["detection_loss"]))
        self.class_name, self.epochs, self.cache_prefix = itemgetter("class_name", "epochs", "cache_prefix")(settings)
        self.seg_learning_rate, self.det_learning_rate = learning_rates(settings)
        refresh_pre_processor(self.pre_processor, settings["image_size"], pipeline, self.image_statistics)
        if "model" in dict(self.named_children()) and self.model_settings != torch_model_settings(settings):
            del self.model  # built again from these settings on its next use (:meth:`build_model`)

    def build_model(self) -> MvfaModel:
        """Build the torch model from the settings (seeded), on this module's device and in its mode."""
        self.model = torch_model_from(self.hparams).to(device=self.device, dtype=self.dtype).train(self.training)
        self.model_settings = torch_model_settings(self.hparams)
        return self.model

    def __getattr__(self, name: str) -> Any:
        """``model`` is built on first use (:meth:`build_model`); other names as ``nn.Module`` finds them."""
        if name != "model" or "support" not in self.__dict__ or "model" in dict(self.named_children()):
            return super().__getattr__(name)  # (before ``support``, the settings are not taken yet)
        return self.build_model()

    @property
    def k_shot(self) -> int:
        """Normal support images (and as many abnormal ones); 0: zero-shot."""
        return self.support.settings.k_shot

    @property
    def image_size(self) -> int:
        """Side of the square input images."""
        return self.support.settings.image_size

    @property
    def feature_pipeline(self) -> FeaturePipeline:
        """The feature pipeline this model runs (see :mod:`anomalib_mvfa.pipeline`)."""
        return resolve_feature_pipeline(self.hparams["feature_pipeline"])

    @property
    def trains_adapters(self) -> bool:
        """Whether this run optimises the adapters (``epochs > 0``)."""
        return self.epochs > 0

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS while adapters train (``epochs > 0``), else FEW_SHOT or ZERO_SHOT (the module's notes say why)."""
        if self.trains_adapters:
            return LearningType.ONE_CLASS
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The paper's epochs; one validation after the last epoch; no sanity validation."""
        return {"max_epochs": self.epochs, "check_val_every_n_epoch": max(self.epochs, 1), "num_sanity_val_steps": 0}

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        feature_pipeline: FeaturePipeline | str | None = None,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
    ) -> PreProcessor:
        """Antialiased bicubic resize; under ``"clip"``, the backbone's normalisation (``mean``, ``std``) too."""
        return mvfa_pre_processor(image_size or (240, 240), resolve_feature_pipeline(feature_pipeline), mean, std)

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """Anomalib's image and pixel AUROC and F1; an AUROC with one class only is NaN with a logged reason."""
        return mvfa_evaluator()

    @classmethod
    def configure_visualizer(cls) -> MvfaVisualizer:
        """The image visualizer of anomalib, keeping the label folders in the output paths."""
        return MvfaVisualizer()

    def configure_post_processor(self) -> PostProcessor:
        """Anomalib's default post-processor: thresholds and normalisation from the validation split."""
        return PostProcessor()

    def configure_callbacks(self) -> list[Callback]:
        """Anomalib's components, the support record, the run files; ``last.ckpt`` while adapters train."""
        checkpointing = self._trainer is None or bool(self._trainer.checkpoint_callbacks)
        resume = [ResumeCheckpoint()] if self.trains_adapters and checkpointing else []
        support = FewShotMemoryBankCallback(self.support)
        checks = ImageRangeCheck()  # before the pre-processor: it sees the batches as the loaders give them
        return [checks, *super().configure_callbacks(), support, RunFiles(), QuietFrozenClip(), *resume]

    def setup(self, stage: str | None = None) -> None:
        """Check the stage's files; shard evaluation under DDP; a fit that trains draws and serves its training set."""
        if self._trainer is None:
            self.prepare()
            return
        datamodule = self._trainer.datamodule
        self.support.check_files(datamodule, stage)
        self.evaluation_sharding.install(self._trainer, self)
        if stage == TrainerFn.FITTING and self.trains_adapters:
            self.model.train()  # built here, before the strategy moves and wraps it
            self.training_set = self.support.training_set(datamodule)
            redirect_loop_data(self._trainer.fit_loop, self)

    def prepare(self) -> None:
        """Load ``adapter_checkpoint`` and build the text features unless there (a restored checkpoint's win)."""
        if self.pending_adapter_checkpoint:
            self.model.load_adapters(self.pending_adapter_checkpoint)
            self.pending_adapter_checkpoint = None
        if self.model.text_features.numel() == 0:
            self.model.setup(class_name=self.resolve_class_name())

    def on_validation_epoch_start(self) -> None:
        """Prepare the model; build the memory banks when needed; warn when the validation images are test images."""
        self.prepare()
        self.support.warn_if_validation_is_test(self._trainer.datamodule)
        self._refresh_memory_bank()

    def on_test_start(self) -> None:
        """Prepare the model (:meth:`prepare`); build the memory banks if there are none."""
        self.prepare()
        self._refresh_memory_bank()

    def on_predict_start(self) -> None:
        """Prepare; build memory banks; read ``PredictDataset`` files (16-bit too) with ``ScanReader``."""
        self.prepare()
        adopt_prediction_datasets(self._trainer.predict_dataloaders)
        self._refresh_memory_bank()

    def resolve_class_name(self) -> str:
        """``class_name``, else the datamodule's name for its category, else ``"object"``."""
        return self.class_name or datamodule_class_name(self._trainer.datamodule if self._trainer else None)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the pre-processor's transform to ``[0, 1]`` images."""
        transform = self.pre_processor.transform if self.pre_processor is not None else None
        return transform(images) if transform is not None else images

    @torch.no_grad()
    def score_images(self, images: torch.Tensor) -> Scores:
        """Score ``[0, 1]`` images as anomalib's test and predict do, each branch's raw outputs in ``branches``."""
        check_image_range(images)
        return self.model.score(self.preprocess(images.to(self.device)))

    @property
    def has_memory_bank(self) -> bool:
        """Whether memory banks exist (built, or restored from a checkpoint)."""
        return self.model.has_memory_bank

    @torch.no_grad()
    def build_memory_bank(self, images: torch.Tensor, groups: torch.Tensor) -> None:
        """Memory banks and calibration from normal ``[0, 1]`` support images with the current adapters."""
        self.prepare()  # adapters and text features first
        was_training = self.model.training
        self.model.eval()
        self.model.setup(reference_images=self.preprocess(images.to(self.device)), reference_groups=groups)
        self.model.train(was_training)

    def _refresh_memory_bank(self) -> None:
        """Build the memory banks when the support set says so (:meth:`FewShotSupport.memory_bank_images`)."""
        support = self.support.memory_bank_images(self.trainer, self.has_memory_bank)
        if support is not None:
            self.build_memory_bank(support.images, support.groups)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Two Adam optimisers, segmentation and detection adapters (:func:`~.training.adapter_optimizers`)."""
        return adapter_optimizers(self.model, self.seg_learning_rate, self.det_learning_rate)

    def train_dataloader(self) -> DataLoader:
        """The training set of the current fit, in a seeded order per epoch (this process's share under DDP)."""
        if self.training_set is None:
            msg = "Mvfa has no training set: its setup hook draws one when a fit with epochs > 0 starts."
            raise RuntimeError(msg)
        return self.training_set.loader()

    val_dataloader = sharded_loaders_hook("val_dataloader")  # under DDP, every image scored once
    test_dataloader = sharded_loaders_hook("test_dataloader")

    def on_train_start(self) -> None:
        """Compute what every step needs once (:class:`~anomalib_mvfa.training.FitInputs`)."""
        training_set = self.training_set or self.train_dataloader()  # raises, naming the cause
        self.prepare()
        self.loss.distributed = self.trainer.world_size > 1  # each process's loss over the processes' mean total
        self.fit_inputs = FitInputs.compute(self, training_set, self.cache_prefix)

    def training_step(self, batch: SupportBatch, batch_idx: int) -> STEP_OUTPUT:
        """One MVFA step on a batch of augmented support images (:func:`~anomalib_mvfa.training.optimisation_step`)."""
        del batch_idx
        return optimisation_step(self, batch, self.fit_inputs)

    def on_train_epoch_end(self) -> None:
        """Print the epoch's mean losses; stop a diverged fit (:func:`~anomalib_mvfa.training.epoch_summary`)."""
        if line := epoch_summary(self.trainer, self.epochs, (self.seg_learning_rate, self.det_learning_rate)):
            logger.info(line)

    def on_train_end(self) -> None:
        """Memory banks from the final adapters; free what the fit computed from its training set."""
        self._refresh_memory_bank()
        self.loss.distributed = False
        self.fit_inputs = self.training_set = None

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score a validation batch; thresholds and normalisation come from its images that are not support images."""
        del args, kwargs
        return self.support.without_support_images(batch.update(**self.model(batch.image)._asdict()))

    def save_adapters(self, path: str | Path) -> Path:
        """Write the adapters alone, in the authors' layout."""
        self.prepare()
        return self.model.save_adapters(path)

    load_from_checkpoint = remembering_checkpoint_path(inspect.getattr_static(AnomalibModule, "load_from_checkpoint"))
    to_torch = prepared_atomic_export(AnomalibModule.to_torch)
    to_onnx = prepared_atomic_export(AnomalibModule.to_onnx)
    to_openvino = prepared_atomic_export(AnomalibModule.to_openvino)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the feature pipeline; leave pretrained CLIP weights out (:func:`~.checkpoints.record_on_save`)."""
        super().on_save_checkpoint(checkpoint)
        record_on_save(checkpoint, self.feature_pipeline, self.hparams.get("pretrained"), self.model.clip)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's settings for those left at their defaults, before ``model`` is built; check its CLIP.

        A model made with no argument loads any checkpoint (:func:`~.checkpoints.adopt_checkpoint_settings`).
        """
        if adopt_checkpoint_settings(self.hparams, MVFA_DEFAULTS, checkpoint):
            self.apply_settings()
        check_loadable(checkpoint, self.hparams, self.model.clip)
        self.pending_adapter_checkpoint = None  # the checkpoint holds the adapters
        super().on_load_checkpoint(checkpoint)
        restore_clip_weights(checkpoint, self.model.clip)


MVFA_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(Mvfa.__init__).parameters.items() if name != "self"
}  # what "left at its default" means for a checkpoint's settings


def datamodule_class_name(datamodule: Any) -> str:
    """The datamodule's name for its category in prompts, else ``"object"``."""
    category = getattr(datamodule, "category", None)
    if category:
        name = getattr(datamodule, "prompt_name", prompt_class_name)(category)
        logger.info("Mvfa prompts use the datamodule's category: '%s'.", name)
        return name
    logger.info("Mvfa has no class name and the datamodule no category: prompts use '%s'.", DEFAULT_CLASS_NAME)
    return DEFAULT_CLASS_NAME


def check_arguments(k_shot: int, epochs: int, batch_size: int, abnormal_source: str, class_name: str | None) -> None:
    """Refuse ``Mvfa`` arguments out of range.

    Raises:
        MvfaInputError: Naming the argument and what was expected.
    """
    if k_shot < 0 or epochs < 0 or batch_size < 1:
        msg = f"Expected k_shot >= 0, epochs >= 0 and batch_size >= 1, got {k_shot}, {epochs} and {batch_size}."
        raise MvfaInputError(msg)
    if not isinstance(abnormal_source, str | Path) or not str(abnormal_source).strip():
        msg = f"abnormal_source must be one of {ABNORMAL_SOURCES} or a folder, got {abnormal_source!r}."
        raise MvfaInputError(msg)
    if class_name is not None and not class_name.strip():
        msg = "class_name must not be empty: give a name or leave it unset to use the datamodule's category."
        raise MvfaInputError(msg)
