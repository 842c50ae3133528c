"""What an ``Mvfa`` Lightning checkpoint holds and which checkpoints a model accepts.

Pure functions over the checkpoint dictionary, called from ``Mvfa.on_save_checkpoint`` and
``Mvfa.on_load_checkpoint``:

- saving records the feature pipeline (:data:`CHECKPOINT_PIPELINE_KEY` and the hyperparameter) and,
  for pretrained CLIP weights, their name and fingerprint (:data:`CHECKPOINT_WEIGHTS_KEY`) instead of
  the weights themselves (:func:`record_on_save`); random CLIP weights cannot be rebuilt and stay;
- loading adopts the checkpoint's settings for every argument left at its default and refuses an
  explicit one that contradicts what the checkpoint was made with (:func:`adopt_checkpoint_settings`),
  before the CLIP backbone is built, so that ``anomalib test|predict|export --model anomalib_mvfa.Mvfa
  --ckpt_path <ckpt>`` needs no other model argument; it refuses a checkpoint made on other CLIP weights
  (:func:`check_loadable`), or of another feature pipeline than one given explicitly
  (:func:`check_feature_pipeline`), and puts the model's CLIP weights back in (:func:`restore_clip_weights`).

Example:
    >>> checkpoint = {"hyper_parameters": {"feature_pipeline": "clip"}}
    >>> checkpoint_feature_pipeline(checkpoint).value
    'clip'
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from .backbone import weights_fingerprint
from .checks import resolve_learning_rates
from .errors import MvfaInputError
from .pipeline import LEGACY_FEATURE_PIPELINE, FeaturePipeline, resolve_feature_pipeline
from .pre_processing import MvfaPreProcessor, mvfa_pre_processor
from .support import SupportSettings
from .torch_model import MvfaModel

__all__ = [
    "ARCHITECTURE_KEYS",
    "CHECKPOINT_PIPELINE_KEY",
    "CHECKPOINT_WEIGHTS_KEY",
    "TORCH_MODEL_KEYS",
    "adopt_checkpoint_settings",
    "build_before_state_dicts",
    "check_feature_pipeline",
    "check_loadable",
    "checkpoint_feature_pipeline",
    "learning_rates",
    "record_on_save",
    "refresh_pre_processor",
    "restore_clip_weights",
    "support_settings",
    "torch_model_from",
    "torch_model_settings",
]

logger = logging.getLogger(__name__)

# Hyperparameters that fix the architecture: a checkpoint only loads into the same ones.
ARCHITECTURE_KEYS = ("backbone", "image_size", "feature_layers")
# Settings of the torch model: a change rebuilds it.
TORCH_MODEL_KEYS = (
    *ARCHITECTURE_KEYS, "pretrained", "feature_pipeline", "image_score_from_map", "memory_bank_ratio",
    "search_precision", "inference_precision", "seed",
)  # fmt: skip
# Settings a checkpoint was made with: given explicitly, another value is refused (others: the given one wins).
FIXED_KEYS = ARCHITECTURE_KEYS
# Arguments of ``Mvfa`` that are anomalib's components, not settings.
COMPONENT_ARGUMENTS = ("pre_processor", "post_processor", "evaluator", "visualizer")
# Adam learning rates of the adapters unless given: few-shot and zero-shot.
FEW_SHOT_LEARNING_RATE = 1e-3
ZERO_SHOT_LEARNING_RATE = 1e-4
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


def adopt_checkpoint_settings(
    settings: MutableMapping[str, Any], defaults: Mapping[str, Any], checkpoint: Mapping[str, Any]
) -> list[str]:
    """Take the checkpoint's stored value of every setting left at its default; the names of those that changed.

    ``settings`` are the model's hyperparameters (changed in place), ``defaults`` the defaults of its
    arguments. A setting given another value than its default keeps it, unless the checkpoint fixes it
    (:data:`FIXED_KEYS`, ``feature_pipeline``) and holds another: that is refused, naming both.

    Example:
        >>> settings = {"backbone": "ViT-L-14-336", "epochs": 5}
        >>> adopt_checkpoint_settings(settings, {"backbone": "ViT-L-14-336", "epochs": 50},
        ...                           {"hyper_parameters": {"backbone": "tiny.json", "epochs": 2}})
        ['backbone']
        >>> settings
        {'backbone': 'tiny.json', 'epochs': 5}

    Raises:
        MvfaInputError: Naming each explicit setting the checkpoint contradicts, with both values.
    """
    stored = {**checkpoint.get("hyper_parameters", {}), "feature_pipeline": checkpoint_feature_pipeline(checkpoint)}
    given = settings.get("feature_pipeline")
    check_feature_pipeline(None if given is None else resolve_feature_pipeline(given), stored["feature_pipeline"])
    stored["feature_pipeline"] = stored["feature_pipeline"].value
    changed, conflicts = [], []
    for key, default in defaults.items():
        if key in COMPONENT_ARGUMENTS or key not in stored:
            continue
        current, saved = _as_list(settings.get(key, default)), _as_list(stored[key])
        if current == saved:
            continue
        if current == _as_list(default):
            settings[key] = stored[key]
            changed.append(key)
        elif key in FIXED_KEYS:
            conflicts.append(f"{key}: checkpoint {saved}, model {current}")
    if conflicts:
        msg = (
            f"This checkpoint was made for another Mvfa architecture ({', '.join(conflicts)}); leave these "
            "arguments unset to use the checkpoint's, or pass the same values."
        )
        raise MvfaInputError(msg)
    if changed:
        logger.info("Mvfa takes the checkpoint's settings: %s.", ", ".join(f"{k}={settings[k]!r}" for k in changed))
    return changed


def support_settings(settings: Mapping[str, Any]) -> SupportSettings:
    """The support set's settings among ``Mvfa``'s (its hyperparameters)."""
    return SupportSettings(
        settings["k_shot"], settings["seed"], settings["image_size"], str(settings["abnormal_source"]),
        settings["few_shot_source"], settings["batch_size"],
    )  # fmt: skip


def learning_rates(settings: Mapping[str, Any]) -> tuple[float, float]:
    """The adapters' learning rates: given (0 keeps those adapters), else 1e-3 (few-shot) or 1e-4 (zero-shot).

    Raises:
        MvfaInputError: If a rate is negative, NaN, infinite or not a number.

    Example:
        >>> learning_rates({"k_shot": 0, "seg_learning_rate": None, "det_learning_rate": 5e-4})
        (0.0001, 0.0005)
    """
    default = FEW_SHOT_LEARNING_RATE if settings["k_shot"] else ZERO_SHOT_LEARNING_RATE
    return resolve_learning_rates(settings["seg_learning_rate"], settings["det_learning_rate"], default)


def refresh_pre_processor(
    pre_processor: Any, image_size: int, pipeline: FeaturePipeline, statistics: tuple[Sequence[float], ...]
) -> None:
    """Make ``Mvfa``'s own pre-processor that of these settings; another pre-processor is left as given."""
    if isinstance(pre_processor, MvfaPreProcessor):
        own = mvfa_pre_processor(image_size, pipeline, *statistics)
        pre_processor.transform, pre_processor.export_transform = own.transform, own.export_transform


def build_model_hook(module: nn.Module, *args: Any) -> None:
    """State-dict hook of ``Mvfa``: its torch model (built on first use) is built before a state dict is taken."""
    del args
    module.model.train(module.training)


def build_before_state_dicts(model: nn.Module) -> None:
    """Build ``model.model`` before ``model``'s state dict is written or loaded, so that it holds the model's keys."""
    model.register_state_dict_pre_hook(build_model_hook)
    model.register_load_state_dict_pre_hook(build_model_hook)


def torch_model_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``Mvfa``'s torch model (:data:`TORCH_MODEL_KEYS`), comparable whatever their sequence type.

    Example:
        >>> torch_model_settings({"feature_layers": (1, 2), "epochs": 3})
        {'feature_layers': [1, 2]}
    """
    return {key: _as_list(settings[key]) for key in TORCH_MODEL_KEYS if key in settings}


def torch_model_from(settings: Mapping[str, Any]) -> MvfaModel:
    """The torch model of ``Mvfa``'s settings (its hyperparameters), initialised from their seed.

    Example:
        >>> torch_model_from(Mvfa(backbone="tiny-random", pretrained=None, image_size=64,
        ...                       feature_layers=(1, 2, 4)).hparams).feature_layers  # doctest: +SKIP
        (1, 2, 4)
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])  # reproducible adapter (and random CLIP) initialisation
        return MvfaModel(
            backbone=settings["backbone"], pretrained=settings["pretrained"], image_size=settings["image_size"],
            feature_layers=settings["feature_layers"], image_score_from_map=settings["image_score_from_map"],
            memory_bank_ratio=settings["memory_bank_ratio"], search_precision=settings["search_precision"],
            feature_pipeline=resolve_feature_pipeline(settings["feature_pipeline"]),
            inference_precision=settings.get("inference_precision", "float32"),  # not in checkpoints before 0.3
        )  # fmt: skip


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


def restore_clip_weights(checkpoint: dict[str, Any], clip: nn.Module) -> None:
    """Put ``clip``'s weights into the checkpoint's state dict; weights the checkpoint holds win."""
    clip_state = {f"{CLIP_PREFIX}{key}": value for key, value in clip.state_dict().items()}
    checkpoint["state_dict"] = {**clip_state, **checkpoint["state_dict"]}


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value
