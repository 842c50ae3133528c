"""MVFA's image encoder: a frozen CLIP image tower with residual adapters after its feature layers.

This module holds the encoder's parts as functions over an image tower and two adapter lists, so
that :class:`~anomalib_mvfa.torch_model.MvfaModel` keeps owning the modules (and with them the
checkpoint keys ``model.seg_adapters.*`` and ``model.det_adapters.*``):

- :class:`Adapter`: one residual adapter (the authors' ``fc1`` / ``fc2`` layout);
- :class:`AdaptedTokens`: the adapted tokens of both branches per feature layer;
- :func:`encode_prefix` and :func:`encode_from`: the frozen prefix up to the first feature layer
  (computed once per support image in training) and the adapted rest of the encoder;
- :func:`check_feature_layers` and :func:`check_images`: what the encoder accepts, refused with a
  :class:`~anomalib_mvfa.errors.MvfaInputError` naming the input.

After each feature layer ``x <- RESIDUAL_WEIGHT x + ADAPTER_WEIGHT seg_out + ADAPTER_WEIGHT det_out``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from anomalib_mvfa.encoder import Adapter, encode_from
    >>> seg = nn.ModuleList(Adapter(1024, 768) for _ in range(4))  # doctest: +SKIP
    >>> det = nn.ModuleList(Adapter(1024, 768) for _ in range(4))  # doctest: +SKIP
    >>> tokens = encode_from(tower, seg, det, (6, 12, 18, 24), tower.embed(images), start=0)  # doctest: +SKIP
    >>> len(tokens.segmentation)  # doctest: +SKIP
    4
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import MvfaInputError
from .towers import VisionTower

__all__ = [
    "ADAPTER_WEIGHT",
    "RESIDUAL_WEIGHT",
    "AdaptedTokens",
    "Adapter",
    "check_feature_layers",
    "check_images",
    "encode_from",
    "encode_prefix",
    "make_adapters",
]

# Weights of the residual stream and the two adapter outputs after each feature layer.
RESIDUAL_WEIGHT = 0.8
ADAPTER_WEIGHT = 0.1


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


def make_adapters(width: int, embed_dim: int, count: int) -> nn.ModuleList:
    """``count`` adapters, the last one's residual update frozen.

    The last adapter's residual update feeds no block (the encoder stops after it) and no loss:
    it never trains, and DDP refuses parameters that get no gradient.

    Example:
        >>> adapters = make_adapters(width=32, embed_dim=16, count=3)
        >>> [adapter.fc2[0].weight.requires_grad for adapter in adapters]
        [True, True, False]
    """
    adapters = nn.ModuleList(Adapter(width, embed_dim) for _ in range(count))
    adapters[-1].fc2.requires_grad_(False)
    return adapters


@dataclass
class AdaptedTokens:
    """Adapted tokens per feature layer: patch tokens (``B x L x C``) and CLS tokens (``B x C``).

    Attributes:
        segmentation, detection: Patch tokens of each branch, CLS token removed: what is scored.
        segmentation_class, detection_class: CLS tokens of each branch (empty lists when not
            kept): the ``"authors"`` feature pipeline puts them in the few-shot memory banks.

    Example:
        >>> tokens = AdaptedTokens([torch.rand(4, 9, 8)], [torch.rand(4, 9, 8)])
        >>> tokens.select(torch.tensor([0, 2])).segmentation[0].shape
        torch.Size([2, 9, 8])
    """

    segmentation: list[torch.Tensor]
    detection: list[torch.Tensor]
    segmentation_class: list[torch.Tensor] = field(default_factory=list)
    detection_class: list[torch.Tensor] = field(default_factory=list)

    def select(self, rows: torch.Tensor) -> AdaptedTokens:
        """The tokens of the images ``rows`` (a boolean mask or indices over the batch)."""
        return AdaptedTokens(*([layer[rows] for layer in part] for part in self.parts()))

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

    def float(self) -> AdaptedTokens:
        """The tokens as float32 (after an encoder run under reduced-precision autocast)."""
        return AdaptedTokens(*([layer.float() for layer in part] for part in self.parts()))

    def parts(self) -> tuple[list[torch.Tensor], ...]:
        """The four per-layer lists, in the order of the constructor's arguments."""
        return self.segmentation, self.detection, self.segmentation_class, self.detection_class

    @classmethod
    def concatenate(cls, chunks: Sequence[AdaptedTokens]) -> AdaptedTokens:
        """The tokens of several batches as one batch, in order.

        Example:
            >>> chunk = AdaptedTokens([torch.rand(2, 9, 8)], [torch.rand(2, 9, 8)])
            >>> AdaptedTokens.concatenate([chunk, chunk]).detection[0].shape
            torch.Size([4, 9, 8])
        """
        parts = zip(*(chunk.parts() for chunk in chunks), strict=True)
        return cls(*([torch.cat(layers) for layers in zip(*part, strict=True)] for part in parts))


def check_feature_layers(feature_layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """``feature_layers`` as a tuple of ints, refused unless strictly increasing 1-based block indices.

    Example:
        >>> check_feature_layers([6, 12, 18, 24], depth=24)
        (6, 12, 18, 24)
    """
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


@torch.no_grad()
def encode_prefix(tower: VisionTower, images: torch.Tensor, first_layer: int) -> torch.Tensor:
    """Frozen part of the encoder: tokens after block ``first_layer``, before its adapter.

    Nothing before the first adapter depends on trainable weights, so training can compute
    this once per support image and continue with :func:`encode_from` in every epoch.

    Example:
        >>> prefix = encode_prefix(tower, images, first_layer=6)  # doctest: +SKIP
        >>> tokens = encode_from(tower, seg, det, (6, 12), prefix, start=6)  # doctest: +SKIP
    """
    return tower.run_blocks(tower.embed(images), 0, first_layer)


def encode_from(
    tower: VisionTower,
    seg_adapters: nn.ModuleList,
    det_adapters: nn.ModuleList,
    feature_layers: Sequence[int],
    tokens: torch.Tensor,
    start: int,
) -> AdaptedTokens:
    """Continue the adapted encoder from the output of block ``start`` (``B x T x W``).

    ``start`` must not exceed the first feature layer; ``start=0`` means the embedded tokens
    of ``tower.embed``. Blocks after the last feature layer are not run, so its adapters'
    residual updates are not computed.

    Example:
        >>> tokens = encode_from(tower, seg, det, (6, 12, 18, 24), tower.embed(images), 0)  # doctest: +SKIP
    """
    segmentation, detection, segmentation_class, detection_class = [], [], [], []
    last = len(feature_layers) - 1
    for index, layer in enumerate(feature_layers):
        tokens = tower.run_blocks(tokens, start, layer)
        start = layer
        seg_adapter, det_adapter = seg_adapters[index], det_adapters[index]
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


def check_images(images: torch.Tensor, image_size: int, name: str = "images", finite: bool = True) -> None:
    """Raise :class:`MvfaInputError` unless ``images`` is a finite ``B x 3 x image_size x image_size`` tensor.

    ``finite=False`` skips the value check, which would make a GPU wait for the host (the
    training step uses it; the package's image readers never produce NaN or infinity).

    Example:
        >>> check_images(torch.rand(2, 3, 64, 64), image_size=64)
        >>> check_images(torch.rand(2, 3, 60, 64), image_size=64)
        Traceback (most recent call last):
        ...
        anomalib_mvfa.errors.MvfaInputError: images must be a tensor of shape B x 3 x 64 x 64, got (2, 3, 60, 64).
    """
    expected = (3, image_size, image_size)
    shape_text = f"B x {' x '.join(map(str, expected))}"
    if isinstance(images, list | tuple):
        shapes = [tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__ for item in images]
        msg = (
            f"{name} is a list of {len(images)} tensors of shapes {shapes}: resize every image to "
            f"{image_size} x {image_size} and stack them into one {shape_text} tensor "
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
    if torch.isfinite(images.sum()):
        return  # one reduction: NaN and infinity carry through a sum (finite values that overflow it: checked below)
    is_finite = torch.isfinite(images)
    if not is_finite.all():
        bad = (~is_finite).flatten(1).sum(dim=1)
        first = int(torch.nonzero(bad)[0, 0])
        msg = (
            f"{name} contain {int(bad.sum())} NaN or infinite value(s), the first in image {first} of the batch: "
            "check the image files and the preprocessing."
        )
        raise MvfaInputError(msg)
