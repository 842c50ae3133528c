"""PyTorch model of MVFA: a frozen CLIP ViT with multi-level visual feature adapters.

Residual adapters after several blocks of CLIP's image encoder project the patch
tokens into CLIP's joint image-text space. Two adapter sets exist: one for
segmentation (pixel level) and one for detection (image level). Each adapted token
is scored against text features of normal and abnormal prompts (zero-shot branch)
and against a memory bank of adapted tokens of a few normal images (few-shot
branch); the two branches are fused after calibration on the normal images.

The parts live in their own modules: the adapted encoder in :mod:`anomalib_mvfa.encoder`,
the memory banks and the few-shot search in :mod:`anomalib_mvfa.memory_bank`, calibration
and fusion in :mod:`anomalib_mvfa.fusion`, and adapter files in :mod:`anomalib_mvfa.adapter_files`.
:class:`MvfaModel` owns the modules and buffers (and so the checkpoint keys) and wires them.

Example:
    >>> import torch
    >>> from anomalib_mvfa import MvfaModel
    >>> model = MvfaModel()  # ViT-L-14-336 with OpenAI weights, image size 240  # doctest: +SKIP
    >>> model.setup(class_name="Brain", reference_images=normal_images)  # doctest: +SKIP
    >>> prediction = model.eval()(images)  # doctest: +SKIP
    >>> prediction.pred_score.shape, prediction.anomaly_map.shape  # doctest: +SKIP
    (torch.Size([8]), torch.Size([8, 240, 240]))

Paper:
    Huang et al., "Adapting Visual-Language Models for Generalizable Anomaly Detection
    in Medical Images", CVPR 2024.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin
from torch import nn
from torch.nn import functional as F  # noqa: N812

from . import adapter_files, encoder
from .backbone import load_clip, pipeline_quick_gelu, set_quick_gelu
from .encoder import AdaptedTokens, Adapter
from .errors import MvfaInputError
from .fusion import BranchOutputs, calibration_groups, calibration_statistics, fuse_branches
from .memory_bank import (
    build_memory_bank,
    build_memory_banks,
    check_memory_bank_settings,
    nearest_neighbour_distance,
    score_against_memory_banks,
)
from .pipeline import FeaturePipeline, resolve_feature_pipeline
from .prompting import DEFAULT_CLASS_NAME, encode_prompt_ensemble
from .towers import vision_tower

__all__ = ["AdaptedTokens", "Adapter", "BranchOutputs", "MvfaModel", "Scores", "TrainingOutputs"]

# CLIP's logit scale applied to cosine similarities between tokens and text features.
LOGIT_SCALE = 100.0


@dataclass
class Scores:
    """What scoring images gives: both branches' raw outputs and the model's fused result.

    Attributes:
        branches: The raw outputs of both branches (see :class:`BranchOutputs`).
        pred_score: ``B`` fused image scores (the maximum of the map with ``image_score_from_map``).
        anomaly_map: ``B x H x W`` fused anomaly maps.
    """

    branches: BranchOutputs
    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


@dataclass
class TrainingOutputs:
    """What MVFA's losses need, one tensor per feature layer.

    Attributes:
        segmentation_logits: ``B x 2 x H x W`` text logits of the segmentation tokens,
            upsampled to the input size (channel 1: abnormal).
        detection_logits: ``B x L x 2`` text logits of the detection tokens.
    """

    segmentation_logits: list[torch.Tensor]
    detection_logits: list[torch.Tensor]


class MvfaModel(DynamicBufferMixin, nn.Module):
    """MVFA: frozen CLIP ViT with segmentation and detection adapters.

    Args:
        backbone: open_clip model name or path of an open_clip model-config JSON file.
        pretrained: open_clip pretrained tag, path of a weights file, or ``None`` for
            random CLIP weights (a warning says that the scores are then meaningless).
        image_size: Side of the square input images; the position embedding is
            resized when it differs from the backbone's.
        feature_layers: 1-based indices of the transformer blocks followed by an
            adapter, strictly increasing.
        image_score_from_map: In ``forward``, take the image score as the maximum of
            the fused anomaly map (the authors' choice for datasets with masks)
            instead of the fused detection score.
        cache_dir: Download folder for pretrained tags.
        quick_gelu: Force QuickGELU on or off; ``None`` decides from the weights.
        memory_bank_ratio: Share of the support tokens kept in each few-shot memory bank,
            chosen by anomalib's k-center-greedy coreset sampler. ``1.0`` (default) keeps all
            of them: the exact search of the paper. Smaller values trade exactness for speed.
        search_precision: ``"float32"`` (default, exact) or ``"bfloat16"``: the few-shot
            nearest neighbour is chosen with bfloat16 similarities, about twice as fast on a
            CPU with bfloat16 instructions (see :func:`~anomalib_mvfa.memory_bank.nearest_neighbour_distance`).
        inference_precision: ``"float32"`` (default) or ``"bfloat16"``: when scoring (eval mode),
            the adapted image encoder runs under bfloat16 autocast on the images' device and its
            tokens return to float32 for the branches, the search and the fusion (fidelity and
            speed: ``anomalib-mvfa speed --deploy``). Training is always float32.
        feature_pipeline: ``"authors"`` (default: the CLIP activation of the authors' loader, CLS
            tokens in the memory banks) or ``"clip"`` (the activation the weights were trained
            with, patch tokens only); see :mod:`anomalib_mvfa.pipeline`. Input normalisation
            belongs to the caller's pre-processing (:func:`anomalib_mvfa.pre_processing.mvfa_pre_processor`).

    Example:
        >>> model = MvfaModel("ViT-B-16", pretrained="openai", image_size=224,
        ...                   feature_layers=(3, 6, 9, 12))  # doctest: +SKIP
        >>> model.setup("bottle", reference_images=torch.rand(4, 3, 224, 224))  # doctest: +SKIP
        >>> outputs = model.branch_outputs(torch.rand(2, 3, 224, 224))  # doctest: +SKIP
        >>> outputs.zero_shot_map.shape, outputs.few_shot_score.shape  # doctest: +SKIP
        (torch.Size([2, 224, 224]), torch.Size([2]))
    """

    # The memory-bank functions, kept reachable from the model (see anomalib_mvfa.memory_bank).
    memory_bank = staticmethod(build_memory_bank)
    nearest_neighbour_distance = staticmethod(nearest_neighbour_distance)

    def __init__(
        self,
        backbone: str | Path = "ViT-L-14-336",
        pretrained: str | Path | None = "openai",
        image_size: int = 240,
        feature_layers: Sequence[int] = (6, 12, 18, 24),
        image_score_from_map: bool = False,
        cache_dir: str | None = None,
        quick_gelu: bool | None = None,
        memory_bank_ratio: float = 1.0,
        search_precision: str = "float32",
        feature_pipeline: FeaturePipeline | str | None = None,
        inference_precision: str = "float32",
    ) -> None:
        super().__init__()
        self.feature_pipeline = resolve_feature_pipeline(feature_pipeline)
        check_memory_bank_settings(memory_bank_ratio, search_precision, inference_precision)
        self.search_precision = search_precision
        self.inference_precision = inference_precision
        self.memory_bank_ratio = memory_bank_ratio
        self.backbone = str(backbone)
        self.image_size = int(image_size)
        self.image_score_from_map = image_score_from_map
        self.pretrained = None if pretrained is None else str(pretrained)
        self.quick_gelu_override = quick_gelu
        self.clip, self.tokenizer = load_clip(
            backbone, pretrained, self.image_size, cache_dir, quick_gelu, self.feature_pipeline
        )
        self.tower = vision_tower(self.clip.visual, self.backbone)
        self.depth = self.tower.depth
        self.feature_layers = encoder.check_feature_layers(feature_layers, self.depth)
        self.grid_size = self.tower.grid_size
        self.width = self.tower.width
        self.embed_dim = self.tower.embed_dim

        self.seg_adapters = encoder.make_adapters(self.width, self.embed_dim, len(self.feature_layers))
        self.det_adapters = encoder.make_adapters(self.width, self.embed_dim, len(self.feature_layers))

        self.class_name: str | None = None
        self.register_buffer("text_features", torch.empty(0))
        self.register_buffer("seg_memory_bank", torch.empty(0))
        self.register_buffer("det_memory_bank", torch.empty(0))
        self.register_buffer("calibration", torch.empty(0))

    def train(self, mode: bool = True) -> MvfaModel:
        """Set the adapters' mode; CLIP stays in eval mode (it is frozen)."""
        super().train(mode)
        self.clip.eval()
        return self

    # ------------------------------------------------------------------ setup

    @property
    def bank_class_tokens(self) -> bool:
        """Whether the few-shot memory banks hold CLS tokens (the ``"authors"`` feature pipeline)."""
        return self.feature_pipeline == FeaturePipeline.AUTHORS

    def set_feature_pipeline(self, feature_pipeline: FeaturePipeline | str) -> None:
        """Switch to another feature pipeline: CLIP's activation and the memory banks' tokens.

        Text features, memory banks and calibration made under the previous setting are
        dropped (they are rebuilt by :meth:`setup`, or loaded from a checkpoint).
        """
        pipeline = resolve_feature_pipeline(feature_pipeline)
        if pipeline == self.feature_pipeline:
            return
        self.feature_pipeline = pipeline
        if self.quick_gelu_override is None:
            quick_gelu = pipeline_quick_gelu(self.backbone, self.pretrained, self.image_size, pipeline)
            set_quick_gelu(self.clip, quick_gelu)
        for name in ("text_features", "seg_memory_bank", "det_memory_bank", "calibration"):
            setattr(self, name, torch.empty(0, device=getattr(self, name).device))

    @property
    def has_memory_bank(self) -> bool:
        """Whether few-shot memory banks have been built."""
        return self.seg_memory_bank.numel() > 0

    @property
    def is_calibrated(self) -> bool:
        """Whether the branch calibration has been computed."""
        return self.calibration.numel() > 0

    @torch.no_grad()
    def setup(
        self,
        class_name: str | None = None,
        reference_images: torch.Tensor | None = None,
        reference_groups: torch.Tensor | None = None,
        batch_size: int = 8,
    ) -> None:
        """Build the text features and, given normal images, the few-shot memory banks.

        The memory banks hold the adapted patch tokens of exactly ``reference_images``
        (augment them beforehand with :func:`anomalib_mvfa.augment_support_set` to
        follow the paper). The same images then calibrate the two branches for
        ``forward`` (see :meth:`calibrate`).

        Args:
            class_name: Object named in the prompts. ``None`` keeps the current text
                features, or uses ``"object"`` when there are none yet.
            reference_images: Normal images, ``N x 3 x H x W``, preprocessed.
            reference_groups: ``N`` integers naming the source image of each reference
                image (augmented copies share their source's group), used for the
                leave-one-out calibration. Defaults to one group per image.
            batch_size: Images encoded at once.

        Example:
            >>> model.setup("Brain")  # zero-shot only  # doctest: +SKIP
            >>> model.setup(reference_images=support_images, reference_groups=groups)  # doctest: +SKIP
        """
        if class_name is not None and not class_name.strip():
            msg = f"class_name must be a non-empty name of the imaged object, got {class_name!r}."
            raise MvfaInputError(msg)
        if class_name is not None or self.text_features.numel() == 0:
            self.set_text_features(class_name or self.class_name or DEFAULT_CLASS_NAME)
        if reference_images is None:
            return
        self.check_images(reference_images, "reference_images")
        tokens = self.encode_batched(reference_images, batch_size)
        self.seg_memory_bank, self.det_memory_bank = build_memory_banks(
            tokens, self.bank_class_tokens, self.memory_bank_ratio
        )
        self.calibrate(reference_images, reference_groups, batch_size, tokens=tokens)

    def encode_prompts(self, class_name: str) -> torch.Tensor:
        """Text features (``C x 2``) of the prompt ensemble of ``class_name``."""
        return encode_prompt_ensemble(class_name, self.clip.encode_text, self.tokenizer, self.clip.logit_scale.device)

    def set_text_features(self, class_name: str) -> None:
        """Encode the prompt ensemble of ``class_name`` into ``text_features`` (``C x 2``)."""
        self.text_features = self.encode_prompts(class_name)
        self.class_name = class_name

    # ---------------------------------------------------------------- encoder

    def check_images(self, images: torch.Tensor, name: str = "images", finite: bool = True) -> None:
        """Raise :class:`~anomalib_mvfa.errors.MvfaInputError` unless ``images`` fit this model.

        See :func:`anomalib_mvfa.encoder.check_images`: a finite ``B x 3 x image_size x image_size``
        float tensor (``finite=False`` skips the value check).
        """
        encoder.check_images(images, self.image_size, name, finite)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``images`` into the token sequence (``B x (1 + L) x W``) entering block 1."""
        return self.tower.embed(images)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start + 1`` to ``stop`` (1-based) without adapters on ``B x T x W`` tokens."""
        return self.tower.run_blocks(tokens, start, stop)

    def encode(self, images: torch.Tensor) -> AdaptedTokens:
        """Run the adapted image encoder and return the adapted tokens per feature layer."""
        return self.encode_from(self.embed(images), start=0)

    def encode_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part of the encoder: tokens after block ``feature_layers[0]`` (see :func:`encoder.encode_prefix`)."""
        return encoder.encode_prefix(self.tower, images, self.feature_layers[0])

    def encode_from(self, tokens: torch.Tensor, start: int) -> AdaptedTokens:
        """Continue the adapted encoder from the output of block ``start`` (see :func:`encoder.encode_from`)."""
        return encoder.encode_from(self.tower, self.seg_adapters, self.det_adapters, self.feature_layers, tokens, start)

    @torch.no_grad()
    def encode_batched(self, images: torch.Tensor, batch_size: int = 8) -> AdaptedTokens:
        """:meth:`encode` in chunks of ``batch_size`` images, without gradients."""
        return AdaptedTokens.concatenate([self.encode(chunk) for chunk in images.split(batch_size)])

    # ---------------------------------------------------------------- scoring

    def _require_text_features(self) -> torch.Tensor:
        if self.text_features.numel() == 0:
            msg = "MvfaModel has no text features: call model.setup(class_name=...) first."
            raise RuntimeError(msg)
        return self.text_features

    def text_logits(self, tokens: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """``100 * normalise(tokens) @ T``: ``B x L x 2`` logits (normal, abnormal).

        ``text_features`` replaces ``T``: ``C x 2`` for all images or ``B x C x 2`` per image
        (zero-shot training over several categories, each with its own prompts).
        """
        text = self._require_text_features() if text_features is None else text_features
        return LOGIT_SCALE * F.normalize(tokens, dim=-1) @ text.to(tokens.dtype)

    def to_map(self, patch_values: torch.Tensor) -> torch.Tensor:
        """Reshape ``B x L x K`` patch values to ``B x K x h x w`` and upsample to the input size.

        Bilinear interpolation with ``align_corners=True``, as in MVFA.
        """
        height, width = self.grid_size
        grid = patch_values.transpose(1, 2).reshape(patch_values.shape[0], -1, height, width)
        return F.interpolate(grid, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)

    def zero_shot_branch(self, tokens: AdaptedTokens) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot anomaly map (``B x H x W``) and score (``B``), summed over feature layers.

        MVFA's abnormal probability of upsampled logits, ``softmax(up(l))[1]``, equals
        ``sigmoid(up(l_abnormal - l_normal))`` because bilinear upsampling is linear: one channel a
        layer is upsampled, every layer in one call.
        """

        def abnormal_margin(layer: torch.Tensor) -> torch.Tensor:
            logits = self.text_logits(layer)
            return logits[..., 1] - logits[..., 0]

        margins = torch.stack([abnormal_margin(layer) for layer in tokens.segmentation], dim=-1)
        anomaly_map = torch.sigmoid(self.to_map(margins)).sum(dim=1)
        score = sum(torch.sigmoid(abnormal_margin(layer)).mean(dim=-1) for layer in tokens.detection)
        return anomaly_map, score

    def few_shot_branch(
        self,
        tokens: AdaptedTokens,
        seg_memory_bank: torch.Tensor,
        det_memory_bank: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Few-shot anomaly map (``B x H x W``) and score (``B``) against the given memory banks."""
        return score_against_memory_banks(tokens, seg_memory_bank, det_memory_bank, self.to_map, self.search_precision)

    def branch_outputs(self, images: torch.Tensor) -> BranchOutputs:
        """Raw outputs of both branches for preprocessed ``B x 3 x H x W`` images.

        The few-shot fields are ``None`` while no memory bank exists (call
        :meth:`setup` with reference images first).
        """
        self.check_images(images)
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.inference_precision == "bfloat16"):
            tokens = self.encode(images)
        tokens = tokens.float()
        zero_shot_map, zero_shot_score = self.zero_shot_branch(tokens)
        if not self.has_memory_bank:
            return BranchOutputs(zero_shot_map, zero_shot_score)
        few_shot_map, few_shot_score = self.few_shot_branch(tokens, self.seg_memory_bank, self.det_memory_bank)
        return BranchOutputs(zero_shot_map, zero_shot_score, few_shot_map, few_shot_score)

    # ------------------------------------------------------------ calibration

    @torch.no_grad()
    def calibrate(
        self,
        normal_images: torch.Tensor,
        groups: torch.Tensor | None = None,
        batch_size: int = 8,
        tokens: AdaptedTokens | None = None,
    ) -> None:
        """Calibrate both branches on normal support images, never on test data.

        For each branch and level (image score, pixel map), the mean and standard
        deviation over the normal images are stored; ``forward`` turns each branch
        into a z-score with them and averages the two (see :mod:`anomalib_mvfa.fusion`).
        Few-shot values of a normal image are computed leave-one-group-out: against the
        tokens of the other groups only, because its own tokens are in the memory bank.

        Args:
            normal_images: ``N x 3 x H x W`` normal images (the support set).
            groups: ``N`` source-image ids; augmented copies of one image share an id.
                Defaults to one group per image. With a single group, each image is
                its own group (a warning says the few-shot statistics are optimistic).
            batch_size: Images encoded at once.
            tokens: Adapted tokens of ``normal_images`` if already computed.
        """
        groups = calibration_groups(groups, normal_images.shape[0])
        if groups is None:
            self.calibration = torch.empty(0, device=normal_images.device)
            return
        if tokens is None:
            tokens = self.encode_batched(normal_images, batch_size)

        def against_others(held_out: AdaptedTokens, others: AdaptedTokens) -> tuple[torch.Tensor, torch.Tensor]:
            return self.few_shot_branch(held_out, *build_memory_banks(others, self.bank_class_tokens))

        self.calibration = calibration_statistics(tokens, groups, self.zero_shot_branch, against_others)

    def fuse(self, outputs: BranchOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse branch outputs into an image score (``B``) and an anomaly map (``B x H x W``).

        See :func:`anomalib_mvfa.fusion.fuse_branches`, with this model's calibration.
        """
        return fuse_branches(outputs, self.calibration)

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        images: torch.Tensor,
        text_features: torch.Tensor | None = None,
    ) -> InferenceBatch | TrainingOutputs:
        """Score images (eval mode) or return the losses' inputs (training mode).

        Args:
            images: Preprocessed ``B x 3 x H x W`` images, ``H = W = image_size``.
            text_features: Training only: text features replacing ``text_features``,
                ``C x 2`` or ``B x C x 2`` (one set per image).

        Returns:
            In eval mode, an ``InferenceBatch`` with ``pred_score`` (``B``) and
            ``anomaly_map`` (``B x H x W``). In training mode, :class:`TrainingOutputs`.
        """
        if self.training:
            self.check_images(images, finite=False)
            return self.training_outputs(self.encode(images), text_features)
        scores = self.score(images)
        return InferenceBatch(pred_score=scores.pred_score, anomaly_map=scores.anomaly_map)

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> Scores:
        """Score preprocessed images: both branches and their fusion (the one scoring path).

        ``forward`` (and so anomalib's test, predict and export) returns the fused part;
        ``anomalib-mvfa evaluate`` also uses the branches for the authors' offline fusion.

        Example:
            >>> scores = model.eval().score(images)  # doctest: +SKIP
            >>> scores.branches.zero_shot_map.shape == scores.anomaly_map.shape  # doctest: +SKIP
            True
        """
        branches = self.branch_outputs(images)
        pred_score, anomaly_map = self.fuse(branches)
        if self.image_score_from_map:
            pred_score = anomaly_map.flatten(1).amax(dim=1)
        return Scores(branches, pred_score, anomaly_map)

    def training_outputs(self, tokens: AdaptedTokens, text_features: torch.Tensor | None = None) -> TrainingOutputs:
        """What the losses need from adapted tokens (see :class:`TrainingOutputs`)."""
        return TrainingOutputs(
            [self.to_map(self.text_logits(layer, text_features)) for layer in tokens.segmentation],
            [self.text_logits(layer, text_features) for layer in tokens.detection],
        )

    # --------------------------------------------------------------- adapters

    def adapter_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Adapters in the authors' layout: ``{"seg_adapters": ..., "det_adapters": ...}``."""
        return adapter_files.adapter_state_dict(self)

    def save_adapters(self, path: str | Path) -> Path:
        """Save the adapters in the authors' layout (see :func:`anomalib_mvfa.adapter_files.save_adapters`).

        Example:
            >>> model.save_adapters("Brain.pth")  # doctest: +SKIP
        """
        return adapter_files.save_adapters(self, path)

    def load_adapters(self, path: str | Path) -> None:
        """Load adapters saved in the authors' layout (see :func:`anomalib_mvfa.adapter_files.load_adapters`).

        Raises:
            ValueError: If the file is not such a checkpoint or its layer count or
                shapes do not fit this backbone and these feature layers.

        Example:
            >>> model.load_adapters("Brain.pth")  # doctest: +SKIP
        """
        adapter_files.load_adapters(self, path)
