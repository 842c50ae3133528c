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

What a fit iterates over: when the fit starts, the few-shot callback
(:class:`~anomalib_mvfa.support.FewShotMemoryBankCallback`) draws and augments the support set
and tells the model (:meth:`Mvfa.train_on`). The model then serves it from its own
``train_dataloader`` hook: it points this fit's training source at itself instead of the
datamodule, which is left untouched (its validation and test loaders serve as usual, and
the next fit attaches the datamodule again). Two Adam optimisers step in ``training_step``
(manual optimisation); Lightning averages the logged losses over each epoch, and the
averages are printed after each epoch.

Training-only inputs (``abnormal_source``, ``few_shot_source``, ``adapter_checkpoint``) are
read when a fit starts, never when a checkpoint is loaded: testing, prediction and export
need only the checkpoint (and the CLIP weights it names).

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

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib import LearningType
from anomalib.data import Batch
from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from .backbone import image_statistics, weights_fingerprint
from .data.datasets import adopt_prediction_datasets
from .distributed import EvaluationSharding, share_run_folder
from .errors import MvfaInputError, MvfaTrainingDivergedError
from .loss import DetectionLoss, MvfaLoss
from .metrics import mvfa_evaluator
from .pipeline import LEGACY_FEATURE_PIPELINE, FeaturePipeline, resolve_feature_pipeline
from .pre_processing import MvfaPreProcessor, mvfa_pre_processor
from .prompting import DEFAULT_CLASS_NAME, prompt_class_name
from .support import ABNORMAL_SOURCES, FewShotMemoryBankCallback, SupportBatch, TrainingSet
from .torch_model import MvfaModel, Scores
from .utils import AtomicCheckpointIO, ResumeCheckpoint, export_atomically
from .visualization import MvfaVisualizer

__all__ = ["Mvfa", "checkpoint_feature_pipeline"]

logger = logging.getLogger(__name__)

FEW_SHOT_LEARNING_RATE = 1e-3
# Support images run through the frozen prefix at once when the fit starts.
PREFIX_CHUNK = 8
ZERO_SHOT_LEARNING_RATE = 1e-4
# Hyperparameters that fix the architecture: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("backbone", "image_size", "feature_layers")
# Checkpoint key of the feature pipeline the checkpoint was made with.
CHECKPOINT_PIPELINE_KEY = "mvfa_feature_pipeline"
# Checkpoint key of the CLIP weights a checkpoint without them needs: {"pretrained", "fingerprint"}.
CHECKPOINT_WEIGHTS_KEY = "mvfa_clip_weights"


class Mvfa(AnomalibModule):
    """MVFA: multi-level visual feature adapters on a frozen CLIP, as an anomalib model.

    Args:
        backbone: open_clip model name or path of an open_clip model-config JSON file
            (``"tiny-random"`` names a tiny test architecture shipped with the package).
        pretrained: open_clip pretrained tag, path of a weights file, or ``None`` for random
            CLIP weights (scores are then meaningless; a warning says so).
        image_size: Side of the square input images.
        feature_layers: 1-based blocks followed by an adapter.
        feature_pipeline: ``"authors"`` (default: what the paper measured and the authors'
            released adapters need: images in ``[0, 1]`` without CLIP's normalisation, the
            activation the authors' loader builds, CLS tokens in the memory banks) or
            ``"clip"`` (CLIP's documented preprocessing and activation); see
            :mod:`anomalib_mvfa.pipeline`. Left unset, a checkpoint's own setting is used when
            one is loaded; an explicit value that differs from the checkpoint's is refused.
        k_shot: Normal support images (and as many abnormal ones). ``0``: zero-shot; with
            ``epochs > 0`` the adapters then train on the labelled images of the datamodule's
            training split (zero-shot across datasets), each with its own category's prompts.
        class_name: Object named in the prompts. Default: the datamodule's category (the
            paper's names for the medical categories), else ``"object"``.
        abnormal_source: Where the K abnormal support images come from: ``"synthetic"``
            (anomalib's Perlin anomaly generator on the K normal images, its masks as
            targets), ``"validation"`` (abnormal images of the datamodule's validation
            split, never the test split), ``"train"`` (abnormal images of the training
            split), a folder of abnormal images (masks in its ``masks/`` subfolder, same
            file stems; without masks they train the detection adapters only), or
            ``"auto"``: ``"train"`` when the training split holds abnormal images,
            ``"synthetic"`` otherwise. A folder is checked when a fit starts.
        few_shot_source: Folder of normal support images instead of the training split.
        epochs: Training epochs over the augmented support set (the paper: 50). ``0``
            trains nothing (use with ``adapter_checkpoint``). The progress bar and the log
            count epochs from 0, as Lightning does.
        batch_size: Support images per optimisation step (the paper: 1).
        seg_learning_rate: Adam learning rate of the segmentation adapters. Default: the paper's
            1e-3 few-shot, 1e-4 zero-shot (``k_shot=0``).
        det_learning_rate: Adam learning rate of the detection adapters (same defaults).
        detection_loss: ``"authors"`` (BCE-with-logits on a probability, as published) or
            ``"bce"`` (corrected).
        seed: Seed of the support selection, the synthetic anomalies and the shuffling.
        adapter_checkpoint: Adapters to start from, in the authors' layout. Read when a fit,
            validation, test or prediction starts (or at export), unless a checkpoint was restored:
            the checkpoint's adapters win, and a loaded checkpoint never needs this file.
        image_score_from_map: Image score = maximum of the fused anomaly map.
        cache_prefix: Few-shot training computes the frozen blocks before the first adapter
            once per support image and reuses them in every epoch (same result, less work).
        memory_bank_ratio: Share of support tokens kept in the few-shot memory banks (coreset);
            ``1.0`` is the paper's exact search.
        search_precision: ``"float32"`` (exact) or ``"bfloat16"`` (the nearest neighbour is
            chosen with bfloat16 similarities, about twice as fast on CPUs with bfloat16
            instructions; its distance is then computed exactly).
        pre_processor: Pre-processor, or ``True`` for the feature pipeline's: bicubic resize to
            ``image_size`` (the same in exported models), plus CLIP normalisation under ``"clip"``.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for image/pixel AUROC and F1 (an AUROC over one class only
            is reported as NaN with a logged reason, not as 0).
        visualizer: Visualizer, or ``True`` for anomalib's image visualizer (output paths keep the
            folders below the dataset root, so images of the same name in two label folders both stay).

    Example:
        >>> model = Mvfa(backbone="tiny-random", pretrained=None, image_size=64,
        ...              feature_layers=(1, 2, 4), epochs=2)  # doctest: +SKIP
        >>> model.learning_type  # doctest: +SKIP
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
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        self._check_arguments(k_shot, epochs, batch_size, abnormal_source, class_name)
        pipeline = resolve_feature_pipeline(feature_pipeline)
        self.image_statistics = image_statistics(backbone)  # the "clip" pipeline's mean and std
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size), pipeline, *self.image_statistics)
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # reproducible adapter (and random CLIP) initialisation
            self.model = MvfaModel(
                backbone=backbone,
                pretrained=pretrained,
                image_size=image_size,
                feature_layers=feature_layers,
                image_score_from_map=image_score_from_map,
                memory_bank_ratio=memory_bank_ratio,
                search_precision=search_precision,
                feature_pipeline=pipeline,
            )
        # None: not chosen by the caller, so a loaded checkpoint's setting is adopted.
        self.requested_feature_pipeline = None if feature_pipeline is None else pipeline
        # read at the first setup or export, unless a checkpoint is restored first
        self.pending_adapter_checkpoint = adapter_checkpoint or None
        self.loss = MvfaLoss(detection_loss=DetectionLoss(detection_loss))
        self.image_size = image_size
        self.k_shot = k_shot
        self.class_name = class_name
        self.abnormal_source = abnormal_source
        self.few_shot_source = few_shot_source
        self.epochs = epochs
        self.batch_size = batch_size
        default_learning_rate = FEW_SHOT_LEARNING_RATE if k_shot else ZERO_SHOT_LEARNING_RATE
        self.seg_learning_rate = seg_learning_rate or default_learning_rate
        self.det_learning_rate = det_learning_rate or default_learning_rate
        self.cache_prefix = cache_prefix
        self.seed = seed
        self.automatic_optimization = False  # two optimisers, stepped together in training_step
        # What the current fit trains on, as the few-shot callback said (train_on), and what is
        # computed from it once when training starts.
        self.training_set: TrainingSet | None = None
        self._evaluation_sharding = EvaluationSharding()
        self._training_text_features: torch.Tensor | None = None  # n x C x 2, one per prompt class
        self._prefix_cache: torch.Tensor | None = None  # N x T x W, row i: support image i
        # epoch mean of the segmentation loss over the images with masks (weighted on the device)
        self.train_seg_loss = MeanMetric(nan_strategy="disable")

    @staticmethod
    def _check_arguments(
        k_shot: int, epochs: int, batch_size: int, abnormal_source: str, class_name: str | None
    ) -> None:
        if k_shot < 0 or epochs < 0 or batch_size < 1:
            msg = f"Expected k_shot >= 0, epochs >= 0 and batch_size >= 1, got {k_shot}, {epochs} and {batch_size}."
            raise MvfaInputError(msg)
        if not isinstance(abnormal_source, str | Path) or not str(abnormal_source).strip():
            msg = f"abnormal_source must be one of {ABNORMAL_SOURCES} or a folder, got {abnormal_source!r}."
            raise MvfaInputError(msg)
        if class_name is not None and not class_name.strip():
            msg = "class_name must not be empty: give a name or leave it unset to use the datamodule's category."
            raise MvfaInputError(msg)

    # ------------------------------------------------------------- settings

    @property
    def feature_pipeline(self) -> FeaturePipeline:
        """The feature pipeline this model runs (see :mod:`anomalib_mvfa.pipeline`)."""
        return self.model.feature_pipeline

    @property
    def trains_adapters(self) -> bool:
        """Whether this run optimises the adapters (``epochs > 0``)."""
        return self.epochs > 0

    @property
    def learning_type(self) -> LearningType:
        """ONE_CLASS while adapters train (so that anomalib's Engine runs ``trainer.fit``), else FEW/ZERO_SHOT."""
        if self.trains_adapters:
            return LearningType.ONE_CLASS
        return LearningType.FEW_SHOT if self.k_shot else LearningType.ZERO_SHOT

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """The paper's epochs; one validation after the last epoch; no sanity validation."""
        return {
            "max_epochs": self.epochs,
            "check_val_every_n_epoch": max(self.epochs, 1),
            "num_sanity_val_steps": 0,
        }

    @classmethod
    def configure_pre_processor(
        cls,
        image_size: tuple[int, int] | None = None,
        feature_pipeline: FeaturePipeline | str | None = None,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
    ) -> PreProcessor:
        """Antialiased bicubic resize to the input size; CLIP normalisation under ``"clip"`` only.

        ``mean`` and ``std``: the backbone's (OpenAI's by default; :func:`~anomalib_mvfa.backbone.image_statistics`).

        Example:
            >>> Mvfa.configure_pre_processor((240, 240), "authors").transform  # doctest: +SKIP
            Compose(
                  Resize(size=[240, 240], interpolation=InterpolationMode.BICUBIC, antialias=True)
            )
        """
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
        """Anomalib's components, the few-shot memory-bank callback and, while adapters train, ``last.ckpt``.

        ``last.ckpt`` is added only when the trainer checkpoints at all (not with
        ``Engine(barebones=True)`` or ``enable_checkpointing=False``).
        """
        checkpointing = self._trainer is None or bool(self._trainer.checkpoint_callbacks)
        resume = [ResumeCheckpoint()] if self.trains_adapters and checkpointing else []
        support = FewShotMemoryBankCallback(
            k_shot=self.k_shot,
            seed=self.seed,
            image_size=self.image_size,
            abnormal_source=str(self.abnormal_source),
            few_shot_source=self.few_shot_source,
            batch_size=self.batch_size,
            train_adapters=self.trains_adapters,
            feature_pipeline=self.feature_pipeline.value,
        )
        return [*super().configure_callbacks(), support, *resume]

    # ------------------------------------------------------------------ setup

    def setup(self, stage: str | None = None) -> None:
        """Install the atomic checkpoint writer; called without a trainer, :meth:`prepare` the model.

        The trainer's default checkpoint writer (Lightning's or anomalib's) is replaced by
        :class:`AtomicCheckpointIO`, so that ``model.ckpt`` and ``last.ckpt`` appear whole or not at
        all; a writer of the user's own is left as it is. Under a trainer, Lightning calls this hook
        before it restores a checkpoint, so the model is prepared later, in the stage's start hooks.
        """
        del stage
        if self._trainer is None:
            self.prepare()
            return
        self._evaluation_sharding.install(self._trainer, self)
        share_run_folder(self._trainer)
        strategy = self._trainer.strategy
        io = strategy.checkpoint_io
        if type(io) in {TorchCheckpointIO, AnomalibCheckpointIO}:
            safe_globals = getattr(io, "extra_safe_globals", None)
            strategy.checkpoint_io = AtomicCheckpointIO(extra_safe_globals=safe_globals)

    def prepare(self) -> None:
        """Load ``adapter_checkpoint`` and build the text features, unless there already.

        Runs when a fit, validation, test or prediction starts (after Lightning has restored any
        checkpoint, whose adapters and text features win: its model never reads the adapter file),
        before a memory bank is built and before an export.
        """
        self._load_pending_adapters()
        if self.model.text_features.numel() == 0:
            self.model.setup(class_name=self.resolve_class_name())

    def _load_pending_adapters(self) -> None:
        if self.pending_adapter_checkpoint:
            self.model.load_adapters(self.pending_adapter_checkpoint)
            self.pending_adapter_checkpoint = None

    def on_fit_start(self) -> None:
        """Prepare the model (:meth:`prepare`); see also :meth:`_silence_frozen_clip_warning`."""
        self.prepare()
        self._silence_frozen_clip_warning()

    def on_validation_start(self) -> None:
        """Prepare the model (:meth:`prepare`)."""
        self.prepare()

    def on_test_start(self) -> None:
        """Prepare the model (:meth:`prepare`)."""
        self.prepare()

    def on_predict_start(self) -> None:
        """Prepare the model (:meth:`prepare`) and read anomalib's prediction datasets with this package's reader.

        ``anomalib predict --data <folder>`` and ``Engine.predict(data_path=...)`` build anomalib's
        ``PredictDataset``, whose reader saturates 16-bit images; its files are read with
        :class:`~anomalib_mvfa.data.ScanReader` instead.
        """
        self.prepare()
        adopt_prediction_datasets(self._trainer.predict_dataloaders if self._trainer is not None else None)

    def resolve_class_name(self) -> str:
        """``class_name``, else the datamodule's name for its category, else ``"object"``."""
        if self.class_name:
            return self.class_name
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        category = getattr(datamodule, "category", None)
        if category:
            name = getattr(datamodule, "prompt_name", prompt_class_name)(category)
            logger.info("Mvfa prompts use the datamodule's category: '%s'.", name)
            return name
        logger.info("Mvfa has no class name and the datamodule no category: prompts use '%s'.", DEFAULT_CLASS_NAME)
        return DEFAULT_CLASS_NAME

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the pre-processor's transform to ``[0, 1]`` images."""
        transform = self.pre_processor.transform if self.pre_processor is not None else None
        return transform(images) if transform is not None else images

    @torch.no_grad()
    def score_images(self, images: torch.Tensor) -> Scores:
        """Score ``[0, 1]`` images: the pre-processor's transform, then both branches and their fusion.

        The public scoring path of the tools (``anomalib-mvfa evaluate``, reports): the same scores as
        anomalib's test and predict, with each branch's raw outputs beside the fused ones.

        Example:
            >>> scores = model.eval().score_images(images)  # doctest: +SKIP
            >>> scores.pred_score.shape, scores.branches.zero_shot_map.shape  # doctest: +SKIP
            (torch.Size([2]), torch.Size([2, 240, 240]))
        """
        return self.model.score(self.preprocess(images.to(self.device)))

    @property
    def has_memory_bank(self) -> bool:
        """Whether memory banks exist (built, or restored from a checkpoint)."""
        return self.model.has_memory_bank

    @torch.no_grad()
    def build_memory_bank(self, images: torch.Tensor, groups: torch.Tensor) -> None:
        """Memory banks and calibration from normal ``[0, 1]`` support images with the current adapters."""
        self.prepare()  # the callback's hooks run before the model's: adapters and text features first
        was_training = self.model.training
        self.model.eval()
        self.model.setup(reference_images=self.preprocess(images.to(self.device)), reference_groups=groups)
        self.model.train(was_training)

    # --------------------------------------------------------------- training

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Two Adam optimisers (segmentation, detection adapters) with betas (0.5, 0.999)."""
        return [
            torch.optim.Adam(self.model.seg_adapters.parameters(), lr=self.seg_learning_rate, betas=(0.5, 0.999)),
            torch.optim.Adam(self.model.det_adapters.parameters(), lr=self.det_learning_rate, betas=(0.5, 0.999)),
        ]

    def train_on(self, training_set: TrainingSet) -> None:
        """Train on ``training_set`` in the fit that is starting (the few-shot callback calls this).

        The fit's training batches then come from :meth:`train_dataloader`; the datamodule, whose
        training split MVFA does not iterate over, is not modified.

        Raises:
            RuntimeError: If the trainer's fit loop has no training source to point at this model
                (a Lightning version this package does not know).
        """
        self.training_set = training_set
        source = getattr(getattr(self.trainer, "fit_loop", None), "_data_source", None)
        if source is None or not hasattr(source, "instance"):
            msg = (
                "Mvfa cannot serve its support set to this Lightning version's fit loop (no fit_loop._data_source); "
                "install a Lightning version that anomalib-mvfa supports (see its pyproject.toml)."
            )
            raise RuntimeError(msg)
        source.instance = self

    def train_dataloader(self) -> DataLoader:
        """The training set of the current fit, in a seeded order per epoch.

        Raises:
            RuntimeError: If no training set was given (the few-shot callback was removed).
        """
        if self.training_set is None:
            msg = (
                "Mvfa has no training set: its FewShotMemoryBankCallback (added by configure_callbacks) draws one "
                "when a fit starts. Do not remove it from the trainer's callbacks."
            )
            raise RuntimeError(msg)
        return self.training_set.loader()

    def val_dataloader(self) -> Any:
        """Under DDP, the datamodule's validation loaders with each image scored once (:mod:`.distributed`)."""
        return self._evaluation_sharding.loaders("val_dataloader", self.trainer)

    def test_dataloader(self) -> Any:
        """Under DDP, the datamodule's test loaders with each image scored once (:mod:`.distributed`)."""
        return self._evaluation_sharding.loaders("test_dataloader", self.trainer)

    def training_step(self, batch: SupportBatch, batch_idx: int) -> STEP_OUTPUT:
        """One MVFA step on a batch of augmented support images; no value is read back from the device."""
        del batch_idx
        seg_optimizer, det_optimizer = self.optimizers()
        text_features = None
        if self._training_text_features is not None:
            text_features = self._training_text_features[batch.class_index]
        if self._prefix_cache is not None:
            prefix = self._prefix_cache[batch.index]  # indexed on the device
            tokens = self.model.encode_from(prefix, start=self.model.feature_layers[0])
        else:  # anomalib's PreProcessor callback has transformed batch.image already
            self.model.check_images(batch.image, "support images", finite=False)
            tokens = self.model.encode(batch.image)
        outputs = self.model.training_outputs(tokens, text_features)
        masks = batch.gt_mask if self.training_set is None or self.training_set.segmentation else None
        seg_loss, det_loss = self.loss(outputs, batch.gt_label, masks, batch.has_mask)
        loss = det_loss if seg_loss is None else seg_loss + det_loss
        seg_optimizer.zero_grad()
        det_optimizer.zero_grad()
        self.manual_backward(loss)
        seg_optimizer.step()
        det_optimizer.step()
        size = batch.image.shape[0]
        # epoch means only: a per-step value in the progress bar would synchronise with the device every step.
        # Under DDP each process's loss is its share of the global one: the epoch means are averaged over the
        # processes (once an epoch), so that every process sees the same value (and stops alike on a NaN).
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
        self.log("train_det_loss", det_loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        if seg_loss is not None:
            # weighted by the batch's share of the images with masks (under DDP: of all processes' images),
            # so that the synced epoch mean is that of one process loading every process's batch
            self.train_seg_loss.update(seg_loss.detach(), weight=self.loss.last_weight_total)
            self.log("train_seg_loss", self.train_seg_loss, on_step=False, on_epoch=True)
        return {"loss": loss.detach()}

    def _silence_frozen_clip_warning(self) -> None:
        """Silence Lightning's "modules in eval mode" warning when those modules are the frozen CLIP's only.

        CLIP stays in eval mode on purpose (:meth:`MvfaModel.train`); any other module in eval mode is
        still reported.
        """
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name == "model.clip" or name.startswith("model.clip.") for name in in_eval):
            warnings.filterwarnings(
                "ignore",
                message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training",
                category=PossibleUserWarning,
            )

    @torch.no_grad()
    def on_train_start(self) -> None:
        """Compute what every step needs once: training text features; the frozen prefix of in-memory images.

        The prefix (the blocks before the first adapter) is cached when ``cache_prefix`` is set
        and the training set holds its images in memory (the few-shot support set).

        Raises:
            RuntimeError: If no training set was given.
        """
        if self.training_set is None:
            self.train_dataloader()  # raises, naming the cause
        # under DDP each process's loss is divided by the mean of the processes' totals (MvfaLoss)
        self.loss.distributed = self.trainer.world_size > 1
        names = self.training_set.class_names
        self._training_text_features = torch.stack([self.model.encode_prompts(n) for n in names]) if names else None
        self._prefix_cache = None
        if self.cache_prefix and self.training_set.images is not None:
            images = self.preprocess(self.training_set.images.to(self.device))
            self.model.check_images(images, "support images")
            self._prefix_cache = torch.cat([self.model.encode_prefix(chunk) for chunk in images.split(PREFIX_CHUNK)])

    def on_train_end(self) -> None:
        """Free what the fit computed from its training set."""
        self.loss.distributed = False
        self._prefix_cache = None
        self._training_text_features = None
        self.training_set = None

    def on_train_epoch_end(self) -> None:
        """Print the epoch's mean losses (as Lightning logged them), so that a run shows them falling.

        Raises:
            FloatingPointError: If the epoch's mean loss is NaN or infinite. Lightning runs this hook
                before its checkpoint callbacks, so nothing of the diverged run is saved.
        """
        logged = self.trainer.callback_metrics
        if "train_loss" not in logged:
            return
        total = float(logged["train_loss"])
        if not math.isfinite(total):
            msg = (
                f"Mvfa training diverged: the mean loss of epoch {self.current_epoch} is NaN or infinite (learning "
                f"rates {self.seg_learning_rate:g} and {self.det_learning_rate:g}). The fit is stopped and no model "
                "or adapter file is written; lower the learning rates or check the images."
            )
            raise MvfaTrainingDivergedError(msg)
        if not self.trainer.is_global_zero:
            return
        segmentation = f"{float(logged['train_seg_loss']):.4f}" if "train_seg_loss" in logged else "not trained"
        logger.info(
            "Mvfa epoch %d/%d: loss %.4f (segmentation %s, detection %.4f)",
            self.current_epoch,
            self.epochs - 1,
            total,
            segmentation,
            float(logged["train_det_loss"]),
        )

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score a validation batch (thresholds and normalisation come from these scores)."""
        del args, kwargs
        predictions = self.model(batch.image)
        return batch.update(**predictions._asdict())

    # ------------------------------------------------------------ checkpoints

    def save_adapters(self, path: str | Path) -> Path:
        """Write the adapters alone, in the authors' layout."""
        self._load_pending_adapters()
        return self.model.save_adapters(path)

    def _check_clip_weights(self, stored: dict[str, str] | None) -> None:
        """Refuse a checkpoint made on other CLIP weights than this model's (it holds only the adapters).

        Raises:
            ValueError: Naming both weights and their fingerprints.
        """
        if not stored:
            return  # the checkpoint holds its CLIP weights (random), or predates the record
        current = weights_fingerprint(self.model.clip.state_dict())
        if current != stored.get("fingerprint"):
            msg = (
                f"This checkpoint was trained on the CLIP weights '{stored.get('pretrained')}' (fingerprint "
                f"{stored.get('fingerprint')}), but this model loaded pretrained='{self.hparams.get('pretrained')}' "
                f"(fingerprint {current}): its adapters would score features they were not trained on. Pass the "
                "weights it was trained with."
            )
            raise MvfaInputError(msg)

    def adopt_feature_pipeline(self, stored: FeaturePipeline) -> None:
        """Run ``stored``, the feature pipeline of a checkpoint being loaded.

        Raises:
            ValueError: If this model was given another feature pipeline explicitly.
        """
        requested = self.requested_feature_pipeline
        if requested is not None and requested != stored:
            msg = (
                f"This checkpoint was made with feature_pipeline='{stored}', but feature_pipeline='{requested}' "
                f"was given: its adapters, text features and memory banks belong to '{stored}'. Leave "
                f"feature_pipeline unset (or set it to '{stored}') to use the checkpoint."
            )
            raise MvfaInputError(msg)
        if stored == self.feature_pipeline:
            return
        logger.info("Mvfa runs the checkpoint's feature_pipeline='%s'.", stored)
        self.model.set_feature_pipeline(stored)
        self.hparams["feature_pipeline"] = stored.value
        if isinstance(self.pre_processor, MvfaPreProcessor):
            own = mvfa_pre_processor(self.image_size, stored, *self.image_statistics)
            self.pre_processor.transform, self.pre_processor.export_transform = own.transform, own.export_transform

    # ----------------------------------------------------------------- export

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Anomalib's torch export, written whole or not at all (see :func:`export_atomically`)."""
        self.prepare()
        export = super().to_torch
        return export_atomically(export_root, lambda root: export(root, model_file_name))

    def to_onnx(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's ONNX export, written whole or not at all."""
        self.prepare()
        export = super().to_onnx
        return export_atomically(export_root, lambda root: export(root, *args, **kwargs))

    def to_openvino(self, export_root: Path | str, *args: Any, **kwargs: Any) -> Path:
        """Anomalib's OpenVINO export (``.bin`` moved before ``.xml``), written whole or not at all."""
        self.prepare()
        export = super().to_openvino
        return export_atomically(export_root, lambda root: export(root, *args, **kwargs))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the feature pipeline; leave pretrained CLIP weights out (rebuilt from ``pretrained``).

        Random CLIP weights (``pretrained=None``) cannot be rebuilt and stay in the checkpoint.
        """
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_PIPELINE_KEY] = self.feature_pipeline.value
        checkpoint.setdefault("hyper_parameters", {})["feature_pipeline"] = self.feature_pipeline.value
        if self.hparams.get("pretrained") is None:
            return
        checkpoint[CHECKPOINT_WEIGHTS_KEY] = {
            "pretrained": str(self.hparams["pretrained"]),
            "fingerprint": weights_fingerprint(self.model.clip.state_dict()),
        }
        checkpoint["state_dict"] = {
            key: value for key, value in checkpoint["state_dict"].items() if not key.startswith("model.clip.")
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture; put this model's CLIP weights back in."""
        saved = checkpoint.get("hyper_parameters", {})
        mismatched = {
            key: (_as_list(saved[key]), _as_list(self.hparams[key]))
            for key in ARCHITECTURE_KEYS
            if key in saved and key in self.hparams and _as_list(saved[key]) != _as_list(self.hparams[key])
        }
        if mismatched:
            details = ", ".join(f"{key}: checkpoint {old}, model {new}" for key, (old, new) in mismatched.items())
            msg = f"This checkpoint was made for another Mvfa architecture ({details}); pass the same model arguments."
            raise MvfaInputError(msg)
        self._check_clip_weights(checkpoint.get(CHECKPOINT_WEIGHTS_KEY))
        self.adopt_feature_pipeline(checkpoint_feature_pipeline(checkpoint))
        self.pending_adapter_checkpoint = None  # the checkpoint holds the adapters
        super().on_load_checkpoint(checkpoint)
        clip_state = {f"model.clip.{key}": value for key, value in self.model.clip.state_dict().items()}
        checkpoint["state_dict"] = {**clip_state, **checkpoint["state_dict"]}  # saved CLIP weights win


def checkpoint_feature_pipeline(checkpoint: dict[str, Any]) -> FeaturePipeline:
    """The feature pipeline a Lightning checkpoint of ``Mvfa`` was made with.

    Checkpoints written before the setting existed used CLIP's normalisation and activation.
    """
    stored = checkpoint.get(CHECKPOINT_PIPELINE_KEY) or checkpoint.get("hyper_parameters", {}).get("feature_pipeline")
    return LEGACY_FEATURE_PIPELINE if stored is None else resolve_feature_pipeline(stored)


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value
