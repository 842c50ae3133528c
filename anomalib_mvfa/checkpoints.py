"""What an ``Mvfa`` Lightning checkpoint holds and which checkpoints a model accepts.

Pure functions over the checkpoint dictionary, called from ``Mvfa.on_save_checkpoint`` and
``Mvfa.on_load_checkpoint``:

- saving records the feature pipeline (:data:`CHECKPOINT_PIPELINE_KEY` and the hyperparameter) and,
  for pretrained CLIP weights, their name and fingerprint (:data:`CHECKPOINT_WEIGHTS_KEY`) instead of
  the weights themselves (:func:`record_on_save`); random CLIP weights cannot be rebuilt and stay;
- loading refuses a checkpoint of another architecture or made on other CLIP weights
  (:func:`check_loadable`), or of another feature pipeline than one given explicitly
  (:func:`check_feature_pipeline`), adopts the checkpoint's feature pipeline (:func:`adopt_feature_pipeline`)
  and puts the model's CLIP weights back in (:func:`restore_clip_weights`).

Example:
    >>> checkpoint = {"hyper_parameters": {"feature_pipeline": "clip"}}
    >>> checkpoint_feature_pipeline(checkpoint).value
    'clip'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from .backbone import weights_fingerprint
from .errors import MvfaInputError
from .pipeline import LEGACY_FEATURE_PIPELINE, FeaturePipeline, resolve_feature_pipeline
from .pre_processing import MvfaPreProcessor, mvfa_pre_processor

if TYPE_CHECKING:
    from .lightning_model import Mvfa

__all__ = [
    "ARCHITECTURE_KEYS",
    "CHECKPOINT_PIPELINE_KEY",
    "CHECKPOINT_WEIGHTS_KEY",
    "adopt_feature_pipeline",
    "check_feature_pipeline",
    "check_loadable",
    "checkpoint_feature_pipeline",
    "record_on_save",
    "restore_clip_weights",
]

logger = logging.getLogger(__name__)

# Hyperparameters that fix the architecture: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("backbone", "image_size", "feature_layers")
# Checkpoint key of the feature pipeline the checkpoint was made with.
CHECKPOINT_PIPELINE_KEY = "mvfa_feature_pipeline"
# Checkpoint key of the CLIP weights a checkpoint without them needs: {"pretrained", "fingerprint"}.
CHECKPOINT_WEIGHTS_KEY = "mvfa_clip_weights"
# Prefix of the CLIP weights in the state dict of ``Mvfa``.
CLIP_PREFIX = "model.clip."


def checkpoint_feature_pipeline(checkpoint: Mapping[str, Any]) -> FeaturePipeline:
    """The feature pipeline a Lightning checkpoint of ``Mvfa`` was made with.

    Checkpoints written before the setting existed used CLIP's normalisation and activation.
    """
    stored = checkpoint.get(CHECKPOINT_PIPELINE_KEY) or checkpoint.get("hyper_parameters", {}).get("feature_pipeline")
    return LEGACY_FEATURE_PIPELINE if stored is None else resolve_feature_pipeline(stored)


def record_on_save(checkpoint: dict[str, Any], pipeline: FeaturePipeline, pretrained: Any, clip: nn.Module) -> None:
    """Record ``pipeline``; with ``pretrained`` weights, their name and fingerprint instead of ``clip``'s weights.

    Example:
        >>> record_on_save(checkpoint, model.feature_pipeline, "openai", model.model.clip)  # doctest: +SKIP
    """
    checkpoint[CHECKPOINT_PIPELINE_KEY] = pipeline.value
    checkpoint.setdefault("hyper_parameters", {})["feature_pipeline"] = pipeline.value
    if pretrained is None:
        return
    checkpoint[CHECKPOINT_WEIGHTS_KEY] = {
        "pretrained": str(pretrained),
        "fingerprint": weights_fingerprint(clip.state_dict()),
    }
    checkpoint["state_dict"] = {
        key: value for key, value in checkpoint["state_dict"].items() if not key.startswith(CLIP_PREFIX)
    }


def check_loadable(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], clip: nn.Module) -> None:
    """Refuse a checkpoint made for another architecture or on other CLIP weights than ``clip``'s.

    Raises:
        MvfaInputError: Naming the mismatched hyperparameters, or both weights and their fingerprints.
    """
    saved = checkpoint.get("hyper_parameters", {})
    mismatched = {
        key: (_as_list(saved[key]), _as_list(hparams[key]))
        for key in ARCHITECTURE_KEYS
        if key in saved and key in hparams and _as_list(saved[key]) != _as_list(hparams[key])
    }
    if mismatched:
        details = ", ".join(f"{key}: checkpoint {old}, model {new}" for key, (old, new) in mismatched.items())
        msg = f"This checkpoint was made for another Mvfa architecture ({details}); pass the same model arguments."
        raise MvfaInputError(msg)
    stored = checkpoint.get(CHECKPOINT_WEIGHTS_KEY)
    if not stored:
        return  # the checkpoint holds its CLIP weights (random), or predates the record
    current = weights_fingerprint(clip.state_dict())
    if current != stored.get("fingerprint"):
        msg = (
            f"This checkpoint was trained on the CLIP weights '{stored.get('pretrained')}' (fingerprint "
            f"{stored.get('fingerprint')}), but this model loaded pretrained='{hparams.get('pretrained')}' "
            f"(fingerprint {current}): its adapters would score features they were not trained on. Pass the "
            "weights it was trained with."
        )
        raise MvfaInputError(msg)


def check_feature_pipeline(requested: FeaturePipeline | None, stored: FeaturePipeline) -> None:
    """Refuse the checkpoint's pipeline ``stored`` when the model was given another one explicitly.

    Raises:
        MvfaInputError: If ``requested`` is set and differs from ``stored``.
    """
    if requested is not None and requested != stored:
        msg = (
            f"This checkpoint was made with feature_pipeline='{stored}', but feature_pipeline='{requested}' "
            f"was given: its adapters, text features and memory banks belong to '{stored}'. Leave "
            f"feature_pipeline unset (or set it to '{stored}') to use the checkpoint."
        )
        raise MvfaInputError(msg)


def adopt_feature_pipeline(model: Mvfa, stored: FeaturePipeline) -> None:
    """Make ``model`` run ``stored``, the feature pipeline of a checkpoint being loaded into it.

    The torch model, the ``feature_pipeline`` hyperparameter and the model's own pre-processor follow.

    Raises:
        MvfaInputError: If the model was given another feature pipeline explicitly.
    """
    check_feature_pipeline(model.requested_feature_pipeline, stored)
    if stored == model.feature_pipeline:
        return
    logger.info("Mvfa runs the checkpoint's feature_pipeline='%s'.", stored)
    model.model.set_feature_pipeline(stored)
    model.hparams["feature_pipeline"] = stored.value
    if isinstance(model.pre_processor, MvfaPreProcessor):
        own = mvfa_pre_processor(model.image_size, stored, *model.image_statistics)
        model.pre_processor.transform, model.pre_processor.export_transform = own.transform, own.export_transform


def restore_clip_weights(checkpoint: dict[str, Any], clip: nn.Module) -> None:
    """Put ``clip``'s weights into the checkpoint's state dict; weights the checkpoint holds win."""
    clip_state = {f"{CLIP_PREFIX}{key}": value for key, value in clip.state_dict().items()}
    checkpoint["state_dict"] = {**clip_state, **checkpoint["state_dict"]}


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value
