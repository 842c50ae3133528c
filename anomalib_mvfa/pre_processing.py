"""Pre-processing of MVFA's input images, the same in training, inference and export.

The pre-processor resizes ``[0, 1]`` images to the model's input size with antialiased
bicubic interpolation (PIL's kernel, as the authors' ``Resize((size, size), BICUBIC)``)
and, under the ``"clip"`` feature pipeline only, normalises them with CLIP's mean and
standard deviation (see :mod:`anomalib_mvfa.pipeline`).

anomalib's exporters replace every ``Resize`` of a pre-processor by one without
antialiasing (its ONNX exporter had no antialiased resize), so an exported model would
score a full-size image differently from the Lightning model. :class:`MvfaPreProcessor`
exports :class:`ExportableResize` instead: the same antialiased bicubic resize written as
two matrix products, which ONNX, ONNX Runtime and OpenVINO run as they are. It agrees with
torch's antialiased resize to about 1e-6.

Example:
    >>> import torch
    >>> from anomalib_mvfa.pre_processing import mvfa_pre_processor
    >>> pre_processor = mvfa_pre_processor(64, "authors")
    >>> pre_processor(torch.rand(2, 3, 256, 256)).shape
    torch.Size([2, 3, 64, 64])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.pre_processing import PreProcessor
from anomalib.pre_processing.utils.transform import get_exportable_transform
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from torchvision.transforms.v2 import Compose, InterpolationMode, Normalize, Resize, Transform

from .pipeline import FeaturePipeline

# Coefficient of the bicubic kernel of PIL and of torch's antialiased resize.
BICUBIC_A = -0.5


def _cubic_kernel(offset: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with ``a = -0.5`` (zero beyond two samples)."""
    x = offset.abs()
    near = ((BICUBIC_A + 2) * x - (BICUBIC_A + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * BICUBIC_A
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def antialiased_bicubic_weights(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """``out_size x in_size`` matrix of an antialiased bicubic resize along one axis.

    Output sample ``i`` is centred at ``(i + 0.5) * in / out`` in input coordinates; when
    shrinking, the kernel is stretched by ``in / out`` (that is the antialiasing); each row
    is normalised to sum 1, which is how torch and PIL treat the image borders.

    Example:
        >>> weights = antialiased_bicubic_weights(8, 4, torch.empty(0))
        >>> weights.shape, bool(torch.allclose(weights.sum(dim=1), torch.ones(4)))
        (torch.Size([4, 8]), True)
    """
    source = torch.arange(in_size, dtype=torch.float32, device=like.device)
    target = torch.arange(out_size, dtype=torch.float32, device=like.device)
    scale = source.new_full((), 1.0) * in_size / out_size  # a tensor: export keeps in_size symbolic
    stretch = torch.clamp(scale, min=1.0)
    centre = (target + 0.5) * scale
    weights = _cubic_kernel((source[None, :] + 0.5 - centre[:, None]) / stretch)
    return weights / weights.sum(dim=1, keepdim=True)


class ExportableResize(nn.Module):
    """Antialiased bicubic resize of ``B x C x H x W`` images as matrix products.

    Same values as ``torchvision.transforms.v2.Resize(size, BICUBIC, antialias=True)`` on
    float images (within about 1e-6), in operations every exporter supports, for any input size.

    Args:
        size: Output ``(height, width)``.

    Example:
        >>> ExportableResize((64, 64))(torch.rand(1, 3, 300, 200)).shape
        torch.Size([1, 3, 64, 64])
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resize ``images`` to ``size``."""
        height, width = images.shape[-2:]
        rows = antialiased_bicubic_weights(height, self.size[0], images).to(images.dtype)
        columns = antialiased_bicubic_weights(width, self.size[1], images).to(images.dtype)
        return rows @ images @ columns.T


def _exportable(transform: Transform | None) -> Any:
    """``transform`` with antialiased bicubic resizes as :class:`ExportableResize`, else as anomalib exports it."""
    if isinstance(transform, Resize) and transform.antialias and transform.interpolation == InterpolationMode.BICUBIC:
        size = transform.size if len(transform.size) == 2 else (transform.size[0], transform.size[0])
        return ExportableResize(tuple(size))
    if isinstance(transform, Compose):
        return Compose([_exportable(step) for step in transform.transforms])
    return get_exportable_transform(transform) if transform is not None else None


class MvfaPreProcessor(PreProcessor):
    """anomalib's pre-processor whose exported resize equals the training and inference resize.

    Example:
        >>> pre_processor = MvfaPreProcessor(transform=Resize((64, 64), antialias=True,
        ...                                  interpolation=InterpolationMode.BICUBIC))
        >>> type(pre_processor.export_transform.transforms[0]).__name__
        'ExportableResize'
    """

    def __init__(self, transform: Transform | None = None) -> None:
        super().__init__(transform=transform)
        self.export_transform = _exportable(copy.deepcopy(self.transform))

    def load_checkpoint_config(self, config: dict[str, Any]) -> None:
        """Restore the transform from a checkpoint and derive the exportable one again."""
        super().load_checkpoint_config(config)
        self.export_transform = _exportable(copy.deepcopy(self.transform))


def mvfa_pre_processor(
    image_size: int | tuple[int, int],
    feature_pipeline: FeaturePipeline | str,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> MvfaPreProcessor:
    """The pre-processor of ``feature_pipeline``: bicubic resize, plus CLIP normalisation under ``"clip"``.

    ``mean`` and ``std`` are the backbone's own (:func:`anomalib_mvfa.backbone.image_statistics`):
    OpenAI's for OpenAI's CLIP, those of the model's config for others (BiomedCLIP's, for example).

    Example:
        >>> [type(step).__name__ for step in mvfa_pre_processor(240, "clip").transform.transforms]
        ['Resize', 'Normalize']
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    steps: list[Transform] = [Resize(size, antialias=True, interpolation=InterpolationMode.BICUBIC)]
    if FeaturePipeline(feature_pipeline) == FeaturePipeline.CLIP:
        steps.append(Normalize(mean=list(mean), std=list(std)))
    return MvfaPreProcessor(transform=Compose(steps))
