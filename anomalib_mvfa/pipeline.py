"""Feature pipelines: what CLIP is fed and how it is built, the authors' way or CLIP's.

Two settings decide the features that MVFA's adapters see:

- ``"authors"`` (default): what the published numbers and the released adapter files come
  from. Images enter CLIP in ``[0, 1]`` (resize, then no mean/std normalisation); the
  activation is the one the authors' loader builds (:func:`uses_quick_gelu`); the
  few-shot memory banks keep each support image's CLS token beside its patch tokens.
- ``"clip"``: CLIP's documented use. Images are normalised with CLIP's mean and standard
  deviation; the activation is the one the weights were trained with (QuickGELU for
  OpenAI's weights); memory banks hold patch tokens only.

Example:
    >>> from anomalib_mvfa.pipeline import FeaturePipeline, uses_quick_gelu
    >>> config = {"vision_cfg": {"image_size": 336}}
    >>> uses_quick_gelu("authors", config, openai_weights=True, image_size=240)
    False
    >>> uses_quick_gelu("clip", config, openai_weights=True, image_size=240)
    True
"""

from __future__ import annotations

import argparse
from enum import Enum
from typing import Any

from .errors import MvfaInputError


class FeaturePipeline(str, Enum):
    """How images become CLIP features: the authors' code (``"authors"``) or CLIP's documented use (``"clip"``)."""

    AUTHORS = "authors"
    CLIP = "clip"

    def __str__(self) -> str:
        """The setting's name, as written in configs."""
        return self.value


DEFAULT_FEATURE_PIPELINE = FeaturePipeline.AUTHORS
# What checkpoints and adapter files written before the setting existed were made with.
LEGACY_FEATURE_PIPELINE = FeaturePipeline.CLIP


def resolve_feature_pipeline(value: FeaturePipeline | str | None) -> FeaturePipeline:
    """The pipeline named by ``value`` (``None``: the default, ``"authors"``).

    Raises:
        ValueError: If ``value`` names no pipeline.

    Example:
        >>> resolve_feature_pipeline(None), resolve_feature_pipeline("clip")
        (<FeaturePipeline.AUTHORS: 'authors'>, <FeaturePipeline.CLIP: 'clip'>)
    """
    if value is None:
        return DEFAULT_FEATURE_PIPELINE
    try:
        return FeaturePipeline(str(value).lower())
    except ValueError:
        choices = ", ".join(repr(item.value) for item in FeaturePipeline)
        msg = f"feature_pipeline must be one of {choices}, got {value!r}."
        raise MvfaInputError(msg) from None


def add_feature_pipeline_argument(parser: argparse.ArgumentParser, default_help: str = "authors") -> None:
    """Add ``--feature-pipeline {authors,clip}`` (default ``None``, resolved by the model) to a command."""
    parser.add_argument(
        "--feature-pipeline",
        choices=[item.value for item in FeaturePipeline],
        default=None,
        help=f"features fed to the adapters: 'authors' (the paper's) or 'clip' (CLIP's documented use); "
        f"default: {default_help}",
    )


def uses_quick_gelu(
    feature_pipeline: FeaturePipeline | str,
    config: dict[str, Any],
    openai_weights: bool,
    image_size: int,
) -> bool:
    """Whether the CLIP built for these settings runs QuickGELU (else exact GELU).

    ``"clip"``: QuickGELU for OpenAI's weights (they were trained with it), otherwise what the
    model config says. ``"authors"`` mirrors the branches of the authors' ``create_model``:

    - OpenAI weights at an image size other than the config's: the network is rebuilt from the
      JSON config, which for OpenAI's architectures has no ``quick_gelu`` key, so exact GELU
      (the paper's ViT-L-14-336 at 240 pixels);
    - OpenAI weights at the config's own size: their OpenAI loader, which builds QuickGELU
      (in the published code this branch stops at an undefined name, ``cache_dir``);
    - any other weights: the model config's ``quick_gelu`` key (their ``force_quick_gelu`` is off).

    Args:
        feature_pipeline: ``"authors"`` or ``"clip"``.
        config: open_clip model config (``vision_cfg.image_size`` is the native size).
        openai_weights: Whether the weights are OpenAI's (tag ``"openai"`` or OpenAI's archive).
        image_size: The size the model runs at.
    """
    from_config = bool(config.get("quick_gelu", False))
    if FeaturePipeline(feature_pipeline) == FeaturePipeline.CLIP:
        return openai_weights or from_config
    if openai_weights:
        native = config.get("vision_cfg", {}).get("image_size", 224)
        return image_size == (native[0] if isinstance(native, list | tuple) else native)
    return from_config
