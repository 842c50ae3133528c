"""PyTorch model of MVFA: a frozen CLIP ViT with multi-level visual feature adapters.

Residual adapters after several blocks of CLIP's image encoder project the patch
tokens into CLIP's joint image-text space. Two adapter sets exist: one for
segmentation (pixel level) and one for detection (image level). Each adapted token
is scored against text features of normal and abnormal prompts (zero-shot branch)
and against a memory bank of adapted tokens of a few normal images (few-shot
branch).

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

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import DynamicBufferMixin, KCenterGreedy
from torch import nn
from torch.nn import functional as F  # noqa: N812

from .backbone import load_clip, pipeline_quick_gelu, set_quick_gelu
from .errors import MvfaInputError
from .pipeline import DEFAULT_FEATURE_PIPELINE, FeaturePipeline, resolve_feature_pipeline
from .prompting import DEFAULT_CLASS_NAME, encode_prompt_ensemble
from .tensor_files import load_tensors_safely
from .towers import vision_tower
from .utils import write_atomically

__all__ = ["AdaptedTokens", "Adapter", "BranchOutputs", "MvfaModel", "Scores", "TrainingOutputs"]

logger = logging.getLogger(__name__)

# Weights of the residual stream and the two adapter outputs after each feature layer.
RESIDUAL_WEIGHT = 0.8
ADAPTER_WEIGHT = 0.1
# CLIP's logit scale applied to cosine similarities between tokens and text features.
LOGIT_SCALE = 100.0
# Rows of the calibration buffer: (branch, level) pairs, each with (mean, std) of normal images.
CALIBRATION_ROWS = ("zero_shot_image", "zero_shot_pixel", "few_shot_image", "few_shot_pixel")
UNCALIBRATED = torch.tensor([[0.0, 1.0]] * len(CALIBRATION_ROWS))
# Memory-bank tokens compared with the queries at once (bounds the memory of the distance matrix).
NEAREST_NEIGHBOUR_CHUNK = 8192
# Precisions of the few-shot nearest-neighbour search (see MvfaModel.nearest_neighbour_distance).
SEARCH_PRECISIONS = ("float32", "bfloat16")
# Key of adapter files that records the feature pipeline the adapters were trained on.
ADAPTER_PIPELINE_KEY = "feature_pipeline"
# (adapter file, feature pipeline) pairs already warned about: one warning each.
_WARNED_ADAPTER_FILES: set[tuple[str, FeaturePipeline]] = set()


def _coreset_indices(bank: torch.Tensor, ratio: float, seed: int = 0) -> list[int]:
    """k-center-greedy coreset of ``bank`` with anomalib's sampler, seeded (its projection and first centre)."""
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=ratio)
    sampler.model.random_state = seed  # the sparse random projection draws from numpy otherwise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random first centre
        return sampler.select_coreset_idxs()


class Adapter(nn.Module):
    """Residual adapter of one feature layer.

    ``mid = LeakyReLU(x W1)`` (dimension ``embed_dim``) is the adapted token used for
    scoring; ``out = LeakyReLU(mid W2)`` (dimension ``width``) goes back into the
    residual stream. The module names give the authors' checkpoint keys
    ``fc1.0.weight`` and ``fc2.0.weight``.

    Args:
        width: Width of the vision transformer.
        embed_dim: Dimension of CLIP's joint image-text space.

    Example:
        >>> adapter = Adapter(width=1024, embed_dim=768)
        >>> mid, out = adapter(torch.rand(2, 290, 1024))
        >>> mid.shape, out.shape
        (torch.Size([2, 290, 768]), torch.Size([2, 290, 1024]))
    """

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(width, embed_dim, bias=False), nn.LeakyReLU(negative_slope=0.01))
        self.fc2 = nn.Sequential(nn.Linear(embed_dim, width, bias=False), nn.LeakyReLU(negative_slope=0.01))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the adapted token and the residual update."""
        mid = self.fc1(tokens)
        return mid, self.fc2(mid)


@dataclass
class AdaptedTokens:
    """Adapted tokens per feature layer: patch tokens (``B x L x C``) and CLS tokens (``B x C``).

    Attributes:
        segmentation, detection: Patch tokens of each branch, CLS token removed: what is scored.
        segmentation_class, detection_class: CLS tokens of each branch (empty lists when not
            kept): the ``"authors"`` feature pipeline puts them in the few-shot memory banks.
    """

    segmentation: list[torch.Tensor]
    detection: list[torch.Tensor]
    segmentation_class: list[torch.Tensor] = field(default_factory=list)
    detection_class: list[torch.Tensor] = field(default_factory=list)

    def select(self, rows: torch.Tensor) -> AdaptedTokens:
        """The tokens of the images ``rows`` (a boolean mask or indices over the batch)."""
        return AdaptedTokens(*([layer[rows] for layer in part] for part in self._parts()))

    def bank_tokens(self, branch: str, with_class_tokens: bool) -> list[torch.Tensor]:
        """Per layer, the ``B x T x C`` tokens of ``branch`` that enter a memory bank.

        ``T = 1 + L`` (CLS token first, as in the authors' banks) with ``with_class_tokens``,
        else ``T = L``.
        """
        patches = self.segmentation if branch == "segmentation" else self.detection
        if not with_class_tokens:
            return patches
        classes = self.segmentation_class if branch == "segmentation" else self.detection_class
        if len(classes) != len(patches):
            msg = "These adapted tokens were computed without their CLS tokens."
            raise MvfaInputError(msg)
        return [torch.cat([cls[:, None], layer], dim=1) for cls, layer in zip(classes, patches, strict=True)]

    def _parts(self) -> tuple[list[torch.Tensor], ...]:
        return self.segmentation, self.detection, self.segmentation_class, self.detection_class


@dataclass
class BranchOutputs:
    """Raw outputs of MVFA's two branches, summed over the feature layers.

    Attributes:
        zero_shot_map: ``B x H x W`` abnormal probability from the segmentation tokens.
        zero_shot_score: ``B`` mean abnormal probability of the detection tokens.
        few_shot_map: ``B x H x W`` nearest-neighbour cosine distance of the
            segmentation tokens, ``None`` without a memory bank.
        few_shot_score: ``B`` mean of the detection tokens' distance map, ``None``
            without a memory bank.
    """

    zero_shot_map: torch.Tensor
    zero_shot_score: torch.Tensor
    few_shot_map: torch.Tensor | None = None
    few_shot_score: torch.Tensor | None = None


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
            CPU with bfloat16 instructions (see :meth:`nearest_neighbour_distance`).
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
    ) -> None:
        super().__init__()
        self.feature_pipeline = resolve_feature_pipeline(feature_pipeline)
        if not 0.0 < memory_bank_ratio <= 1.0:
            msg = f"memory_bank_ratio must be in (0, 1], got {memory_bank_ratio}."
            raise MvfaInputError(msg)
        if search_precision not in SEARCH_PRECISIONS:
            msg = f"search_precision must be one of {SEARCH_PRECISIONS}, got {search_precision!r}."
            raise MvfaInputError(msg)
        self.search_precision = search_precision
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
        self.feature_layers = self._check_feature_layers(feature_layers, self.depth)
        self.grid_size = self.tower.grid_size
        self.width = self.tower.width
        self.embed_dim = self.tower.embed_dim

        self.seg_adapters = nn.ModuleList(Adapter(self.width, self.embed_dim) for _ in self.feature_layers)
        self.det_adapters = nn.ModuleList(Adapter(self.width, self.embed_dim) for _ in self.feature_layers)
        # The last adapters' residual update feeds no block (the encoder stops after them) and no loss:
        # it never trains, and DDP refuses parameters that get no gradient.
        for adapters in (self.seg_adapters, self.det_adapters):
            adapters[-1].fc2.requires_grad_(False)

        self.class_name: str | None = None
        self.register_buffer("text_features", torch.empty(0))
        self.register_buffer("seg_memory_bank", torch.empty(0))
        self.register_buffer("det_memory_bank", torch.empty(0))
        self.register_buffer("calibration", torch.empty(0))

    @staticmethod
    def _check_feature_layers(feature_layers: Sequence[int], depth: int) -> tuple[int, ...]:
        layers = tuple(int(layer) for layer in feature_layers)
        if (
            not layers
            or any(layer < 1 or layer > depth for layer in layers)
            or any(b <= a for a, b in itertools.pairwise(layers))
        ):
            msg = (
                f"feature_layers={tuple(feature_layers)} is not valid for a backbone with {depth} blocks: "
                f"expected strictly increasing 1-based block indices between 1 and {depth}."
            )
            raise MvfaInputError(msg)
        return layers

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
        self.seg_memory_bank = self.memory_bank(
            tokens.bank_tokens("segmentation", self.bank_class_tokens), self.memory_bank_ratio
        )
        self.det_memory_bank = self.memory_bank(
            tokens.bank_tokens("detection", self.bank_class_tokens), self.memory_bank_ratio
        )
        self.calibrate(reference_images, reference_groups, batch_size, tokens=tokens)

    def encode_prompts(self, class_name: str) -> torch.Tensor:
        """Text features (``C x 2``) of the prompt ensemble of ``class_name``."""
        return encode_prompt_ensemble(class_name, self.clip.encode_text, self.tokenizer, self.clip.logit_scale.device)

    def set_text_features(self, class_name: str) -> None:
        """Encode the prompt ensemble of ``class_name`` into ``text_features`` (``C x 2``)."""
        self.text_features = self.encode_prompts(class_name)
        self.class_name = class_name

    @staticmethod
    def memory_bank(layer_tokens: list[torch.Tensor], ratio: float = 1.0) -> torch.Tensor:
        """Normalised tokens of all images per layer, ``n_layers x M x C`` (``M = N * T`` when exact).

        ``layer_tokens`` holds one ``N x T x C`` tensor per layer (see :meth:`AdaptedTokens.bank_tokens`).

        With ``ratio < 1`` each layer keeps a k-center-greedy coreset of its tokens (seeded).
        """
        banks = [F.normalize(tokens, dim=-1).flatten(0, 1) for tokens in layer_tokens]
        if ratio < 1.0:
            banks = [bank[_coreset_indices(bank, ratio)] for bank in banks]
        return torch.stack(banks)

    # ---------------------------------------------------------------- encoder

    def check_images(self, images: torch.Tensor, name: str = "images", finite: bool = True) -> None:
        """Raise ``ValueError`` unless ``images`` is a finite ``B x 3 x image_size x image_size`` tensor.

        ``finite=False`` skips the value check, which would make a GPU wait for the host (the
        training step uses it; the package's image readers never produce NaN or infinity).

        Example:
            >>> model.check_images([torch.rand(3, 240, 240), torch.rand(3, 200, 300)])  # doctest: +SKIP
            ValueError: images is a list of 2 tensors of shapes [(3, 240, 240), (3, 200, 300)]: ...
        """
        expected = (3, self.image_size, self.image_size)
        shape_text = f"B x {' x '.join(map(str, expected))}"
        if isinstance(images, list | tuple):
            shapes = [tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__ for item in images]
            msg = (
                f"{name} is a list of {len(images)} tensors of shapes {shapes}: resize every image to "
                f"{self.image_size} x {self.image_size} and stack them into one {shape_text} tensor "
                "(anomalib's PreProcessor does this for the Lightning module)."
            )
            raise MvfaInputError(msg)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            msg = f"{name} must be a tensor of shape {shape_text}, got {shape}."
            raise MvfaInputError(msg)
        if images.shape[0] == 0:
            msg = f"{name} is an empty batch (shape {tuple(images.shape)}): give at least one image."
            raise MvfaInputError(msg)
        if images.is_meta:
            msg = f"{name} is on the 'meta' device, which holds no values: move it to the model's device first."
            raise MvfaInputError(msg)
        if not images.is_floating_point():
            msg = (
                f"{name} has dtype {images.dtype}; the model takes preprocessed float images. For 8-bit images "
                "divide by 255 (images.float() / 255) and apply the pre-processor (Mvfa.pre_processor, or "
                "anomalib_mvfa.pre_processing.mvfa_pre_processor)."
            )
            raise MvfaInputError(msg)
        if not finite or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
            return  # exported graphs take no data-dependent branch
        is_finite = torch.isfinite(images)
        if not is_finite.all():
            bad = (~is_finite).flatten(1).sum(dim=1)
            first = int(torch.nonzero(bad)[0, 0])
            msg = (
                f"{name} contain {int(bad.sum())} NaN or infinite value(s), the first in image {first} of the batch: "
                "check the image files and the preprocessing."
            )
            raise MvfaInputError(msg)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``images`` into the token sequence (``B x (1 + L) x W``) entering block 1."""
        return self.tower.embed(images)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start + 1`` to ``stop`` (1-based) without adapters on ``B x T x W`` tokens."""
        return self.tower.run_blocks(tokens, start, stop)

    def encode(self, images: torch.Tensor) -> AdaptedTokens:
        """Run the adapted image encoder and return the adapted patch tokens per feature layer.

        After each feature layer ``x <- 0.8 x + 0.1 seg_out + 0.1 det_out``. Blocks after
        the last feature layer are not run, so its adapters' residual updates are not computed.
        """
        tokens = self.embed(images)
        return self.encode_from(tokens, start=0)

    @torch.no_grad()
    def encode_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen part of the encoder: tokens after block ``feature_layers[0]``, before its adapter.

        Nothing before the first adapter depends on trainable weights, so training can compute
        this once per support image and continue with :meth:`encode_from` in every epoch.
        """
        return self.run_blocks(self.embed(images), 0, self.feature_layers[0])

    def encode_from(self, tokens: torch.Tensor, start: int) -> AdaptedTokens:
        """Continue the adapted encoder from the output of block ``start`` (``B x T x W``).

        ``start`` must not exceed the first feature layer; ``start=0`` means the
        embedded tokens of :meth:`embed`.
        """
        segmentation, detection, segmentation_class, detection_class = [], [], [], []
        last = len(self.feature_layers) - 1
        for index, layer in enumerate(self.feature_layers):
            tokens = self.run_blocks(tokens, start, layer)
            start = layer
            seg_adapter, det_adapter = self.seg_adapters[index], self.det_adapters[index]
            if index == last:  # nothing runs after the last adapter: its residual update is unused
                seg_mid, det_mid = seg_adapter.fc1(tokens), det_adapter.fc1(tokens)
            else:
                (seg_mid, seg_out), (det_mid, det_out) = seg_adapter(tokens), det_adapter(tokens)
                tokens = RESIDUAL_WEIGHT * tokens + ADAPTER_WEIGHT * seg_out + ADAPTER_WEIGHT * det_out
            segmentation.append(seg_mid[:, 1:])
            detection.append(det_mid[:, 1:])
            segmentation_class.append(seg_mid[:, 0])
            detection_class.append(det_mid[:, 0])
        return AdaptedTokens(segmentation, detection, segmentation_class, detection_class)

    @torch.no_grad()
    def encode_batched(self, images: torch.Tensor, batch_size: int = 8) -> AdaptedTokens:
        """:meth:`encode` in chunks of ``batch_size`` images, without gradients."""
        chunks = [self.encode(chunk) for chunk in images.split(batch_size)]
        parts = zip(*(chunk._parts() for chunk in chunks), strict=True)
        return AdaptedTokens(*([torch.cat(layers) for layers in zip(*part, strict=True)] for part in parts))

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
        """Zero-shot anomaly map (``B x H x W``) and score (``B``), summed over feature layers."""
        anomaly_map = sum(
            torch.softmax(self.to_map(self.text_logits(layer)), dim=1)[:, 1] for layer in tokens.segmentation
        )
        score = sum(torch.softmax(self.text_logits(layer), dim=-1)[..., 1].mean(dim=-1) for layer in tokens.detection)
        return anomaly_map, score

    @staticmethod
    def nearest_neighbour_distance(
        queries: torch.Tensor, memory_bank: torch.Tensor, precision: str = "float32"
    ) -> torch.Tensor:
        """``min_m (1 - cos(q, m))`` for ``B x L x C`` queries and a normalised ``N x C`` memory bank.

        The memory bank is processed in fixed chunks, so the peak memory does not grow with its
        size and the number of chunks does not depend on the batch (export-friendly).

        Args:
            queries: ``B x L x C`` tokens.
            memory_bank: ``N x C`` normalised tokens.
            precision: ``"float32"`` searches exactly. ``"bfloat16"`` picks the neighbour with
                bfloat16 similarities (about twice as fast on CPUs with bfloat16 instructions)
                and returns that neighbour's exact distance: a query whose nearest neighbour
                is missed gets the distance of one that is at most a few thousandths farther.

        Example:
            >>> bank = F.normalize(torch.randn(50, 8), dim=-1)
            >>> MvfaModel.nearest_neighbour_distance(bank[None, :3], bank).abs().max() < 1e-6
            tensor(True)
        """
        flat = F.normalize(queries, dim=-1).flatten(0, 1)
        memory = memory_bank.to(flat.dtype)
        if precision == "float32":
            similarity = torch.stack(
                [(flat @ chunk.T).amax(dim=1) for chunk in memory.split(NEAREST_NEIGHBOUR_CHUNK)]
            ).amax(dim=0)
        elif precision == "bfloat16":
            low = flat.to(torch.bfloat16)
            best = [(low @ chunk.T).max(dim=1) for chunk in memory.to(torch.bfloat16).split(NEAREST_NEIGHBOUR_CHUNK)]
            values = torch.stack([found.values for found in best])
            offsets = torch.arange(0, memory.shape[0], NEAREST_NEIGHBOUR_CHUNK, device=flat.device)
            indices = torch.stack([found.indices for found in best]) + offsets[:, None]
            nearest = indices.gather(0, values.argmax(dim=0, keepdim=True))[0]
            similarity = (flat * memory[nearest]).sum(dim=-1)
        else:
            msg = f"precision must be 'float32' or 'bfloat16', got {precision!r}."
            raise MvfaInputError(msg)
        return (1.0 - similarity).reshape(queries.shape[:2])

    def few_shot_branch(
        self,
        tokens: AdaptedTokens,
        seg_memory_bank: torch.Tensor,
        det_memory_bank: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Few-shot anomaly map (``B x H x W``) and score (``B``) against the given memory banks."""

        def distance_map(layer: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            return self.to_map(self.nearest_neighbour_distance(layer, memory, self.search_precision)[..., None])[:, 0]

        anomaly_map = sum(
            distance_map(layer, memory) for layer, memory in zip(tokens.segmentation, seg_memory_bank, strict=True)
        )
        score = sum(
            distance_map(layer, memory).mean(dim=(-2, -1))
            for layer, memory in zip(tokens.detection, det_memory_bank, strict=True)
        )
        return anomaly_map, score

    def branch_outputs(self, images: torch.Tensor) -> BranchOutputs:
        """Raw outputs of both branches for preprocessed ``B x 3 x H x W`` images.

        The few-shot fields are ``None`` while no memory bank exists (call
        :meth:`setup` with reference images first).
        """
        self.check_images(images)
        tokens = self.encode(images)
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
        into a z-score with them and averages the two. Few-shot values of a normal
        image are computed leave-one-group-out: against the tokens of the other
        groups only, because its own tokens are in the memory bank.

        Args:
            normal_images: ``N x 3 x H x W`` normal images (the support set).
            groups: ``N`` source-image ids; augmented copies of one image share an id.
                Defaults to one group per image. With a single group, each image is
                its own group (a warning says the few-shot statistics are optimistic).
            batch_size: Images encoded at once.
            tokens: Adapted tokens of ``normal_images`` if already computed.
        """
        if normal_images.shape[0] < 2:
            logger.warning("Calibration needs at least 2 normal images; forward will fuse uncalibrated branches.")
            self.calibration = torch.empty(0, device=normal_images.device)
            return
        groups = torch.arange(normal_images.shape[0]) if groups is None else torch.as_tensor(groups).cpu()
        if groups.shape != (normal_images.shape[0],):
            msg = (
                f"groups must hold one id per normal image ({normal_images.shape[0]}), got shape {tuple(groups.shape)}."
            )
            raise MvfaInputError(msg)
        if groups.unique().numel() < 2:
            logger.warning("All normal images share one group: few-shot calibration treats each image as a group.")
            groups = torch.arange(normal_images.shape[0])
        if tokens is None:
            tokens = self.encode_batched(normal_images, batch_size)
        zero_shot_map, zero_shot_score = self.zero_shot_branch(tokens)

        few_shot_map = torch.empty_like(zero_shot_map)
        few_shot_score = torch.empty_like(zero_shot_score)
        for group in groups.unique():
            inside = (groups == group).to(zero_shot_map.device)
            held_out, others = tokens.select(inside), tokens.select(~inside)
            seg_bank = self.memory_bank(others.bank_tokens("segmentation", self.bank_class_tokens))
            det_bank = self.memory_bank(others.bank_tokens("detection", self.bank_class_tokens))
            few_shot_map[inside], few_shot_score[inside] = self.few_shot_branch(held_out, seg_bank, det_bank)

        values = (zero_shot_score, zero_shot_map, few_shot_score, few_shot_map)
        self.calibration = torch.stack([torch.stack([value.mean(), value.std()]) for value in values]).float()

    def fuse(self, outputs: BranchOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse branch outputs into an image score (``B``) and an anomaly map (``B x H x W``).

        With a memory bank: the average of the two branches' z-scores with respect to
        the calibration statistics (raw sum when not calibrated). Without: the
        zero-shot branch alone.
        """
        if outputs.few_shot_map is None or outputs.few_shot_score is None:
            return outputs.zero_shot_score, outputs.zero_shot_map
        calibration = self.calibration if self.is_calibrated else UNCALIBRATED.to(outputs.zero_shot_map.device)
        mean, std = calibration[:, 0], calibration[:, 1].clamp_min(torch.finfo(torch.float32).eps)
        branch_values = (outputs.zero_shot_score, outputs.zero_shot_map, outputs.few_shot_score, outputs.few_shot_map)
        zs_score, zs_map, fs_score, fs_map = ((v - m) / s for v, m, s in zip(branch_values, mean, std, strict=True))
        return 0.5 * (zs_score + fs_score), 0.5 * (zs_map + fs_map)

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
        return {
            "seg_adapters": {key: value.detach().cpu() for key, value in self.seg_adapters.state_dict().items()},
            "det_adapters": {key: value.detach().cpu() for key, value in self.det_adapters.state_dict().items()},
        }

    def save_adapters(self, path: str | Path) -> Path:
        """Save the adapters in the authors' layout; the file appears whole or not at all.

        Beside the two adapter keys, ``"feature_pipeline"`` records the features they were
        trained on (the authors' code reads only the adapter keys).

        Example:
            >>> model.save_adapters("Brain.pth")  # doctest: +SKIP
        """
        state = {**self.adapter_state_dict(), ADAPTER_PIPELINE_KEY: self.feature_pipeline.value}
        return write_atomically(path, lambda name: torch.save(state, name))

    def load_adapters(self, path: str | Path) -> None:
        """Load adapters saved in the authors' layout (``weights_only=True``).

        Raises:
            ValueError: If the file is not such a checkpoint or its layer count or
                shapes do not fit this backbone and these feature layers.

        Example:
            >>> model.load_adapters("Brain.pth")  # doctest: +SKIP
        """
        path = Path(path)
        try:
            checkpoint = load_tensors_safely(path, "Adapter checkpoint")
        except FileNotFoundError as error:
            raise MvfaInputError(str(error)) from error
        if not isinstance(checkpoint, dict) or not {"seg_adapters", "det_adapters"} <= set(checkpoint):
            found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
            msg = f"Adapter checkpoint '{path}' must hold 'seg_adapters' and 'det_adapters', found {found}."
            raise MvfaInputError(msg)
        for name in ("seg_adapters", "det_adapters"):
            self._check_adapter_state(path, name, checkpoint[name])
            for key, value in checkpoint[name].items():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    msg = (
                        f"Adapter checkpoint '{path}' holds {bad} NaN or infinite value(s) in '{name}' "
                        f"'{key}': adapters from a diverged training cannot score."
                    )
                    raise MvfaInputError(msg)
        self.seg_adapters.load_state_dict(checkpoint["seg_adapters"])
        self.det_adapters.load_state_dict(checkpoint["det_adapters"])
        self._warn_on_pipeline_mismatch(path, checkpoint.get(ADAPTER_PIPELINE_KEY))

    def _warn_on_pipeline_mismatch(self, path: Path, recorded: object) -> None:
        """Warn (once per file and setting) when adapters were trained on other features than this model's."""
        trained_on = DEFAULT_FEATURE_PIPELINE if recorded is None else resolve_feature_pipeline(str(recorded))
        if trained_on == self.feature_pipeline:
            return
        key = (str(path.resolve()), self.feature_pipeline)
        if key in _WARNED_ADAPTER_FILES:
            return
        _WARNED_ADAPTER_FILES.add(key)
        origin = "like the authors' released adapters it has no record, which means" if recorded is None else "recorded"
        logger.warning(
            "Adapter file '%s' was trained under feature_pipeline='%s' (%s), but this model runs "
            "feature_pipeline='%s': the adapters see features they were not trained on. Set "
            "feature_pipeline='%s' to use them as trained.",
            path,
            trained_on,
            origin if recorded is not None else f"{origin} '{trained_on}'",
            self.feature_pipeline,
            trained_on,
        )

    def _check_adapter_state(self, path: Path, name: str, state: object) -> None:
        expected = {key: tuple(value.shape) for key, value in getattr(self, name).state_dict().items()}
        found = (
            {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}
            if isinstance(state, dict)
            else {}
        )
        if found == expected:
            return
        layers = len({key.split(".")[0] for key in found})
        shapes = sorted({shape for key, shape in found.items() if key.endswith("fc1.0.weight")})
        msg = (
            f"Adapter checkpoint '{path}' does not fit: its '{name}' has {layers} layer(s) with fc1 weight "
            f"shape(s) {shapes}, but backbone '{self.backbone}' with feature_layers={self.feature_layers} "
            f"expects {len(self.feature_layers)} layer(s) with fc1 weight shape "
            f"{(self.embed_dim, self.width)} (embed_dim x width)."
        )
        raise MvfaInputError(msg)
