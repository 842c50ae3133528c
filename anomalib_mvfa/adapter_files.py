"""Adapter files: MVFA's trained adapters alone, in the authors' layout.

An adapter file is a ``torch.save`` of ``{"seg_adapters": state_dict, "det_adapters": state_dict}``
with keys ``"{i}.fc1.0.weight"`` (``embed_dim x width``) and ``"{i}.fc2.0.weight"``
(``width x embed_dim``), plus ``"feature_pipeline"``: the features the adapters were trained on
(absent in the authors' files, which count as ``"authors"``). Files are read with
:func:`~anomalib_mvfa.tensor_files.load_tensors_safely` and refused, naming what is wrong, unless
they fit the model: same layer count and shapes, finite values.

The functions take the model (an :class:`AdapterOwner`, such as
:class:`~anomalib_mvfa.torch_model.MvfaModel`), which keeps owning the adapter modules.

Example:
    >>> from anomalib_mvfa import MvfaModel
    >>> from anomalib_mvfa.adapter_files import load_adapters, save_adapters
    >>> model = MvfaModel()  # doctest: +SKIP
    >>> path = save_adapters(model, "Brain.pth")  # doctest: +SKIP
    >>> load_adapters(MvfaModel(), path)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .errors import MvfaInputError
from .pipeline import DEFAULT_FEATURE_PIPELINE, FeaturePipeline, resolve_feature_pipeline
from .tensor_files import load_tensors_safely
from .utils import write_atomically

__all__ = [
    "ADAPTER_KEYS",
    "ADAPTER_PIPELINE_KEY",
    "AdapterOwner",
    "adapter_state_dict",
    "load_adapters",
    "save_adapters",
]

logger = logging.getLogger(__name__)

# Keys of adapter files that hold the two adapter sets (also the model's attribute names).
ADAPTER_KEYS = ("seg_adapters", "det_adapters")
# Key of adapter files that records the feature pipeline the adapters were trained on.
ADAPTER_PIPELINE_KEY = "feature_pipeline"
# (adapter file, feature pipeline) pairs already warned about: one warning each.
_WARNED_ADAPTER_FILES: set[tuple[str, FeaturePipeline]] = set()


class AdapterOwner(Protocol):
    """What the adapter files need of a model: its adapters and what they must fit."""

    seg_adapters: nn.ModuleList
    det_adapters: nn.ModuleList
    feature_pipeline: FeaturePipeline
    backbone: str
    feature_layers: tuple[int, ...]


def adapter_state_dict(model: AdapterOwner) -> dict[str, dict[str, torch.Tensor]]:
    """The model's adapters in the authors' layout: ``{"seg_adapters": ..., "det_adapters": ...}``, on the CPU.

    Example:
        >>> sorted(adapter_state_dict(model))  # doctest: +SKIP
        ['det_adapters', 'seg_adapters']
    """
    return {
        name: {key: value.detach().cpu() for key, value in getattr(model, name).state_dict().items()}
        for name in ADAPTER_KEYS
    }


def save_adapters(model: AdapterOwner, path: str | Path) -> Path:
    """Save the model's adapters in the authors' layout; the file appears whole or not at all.

    Beside the two adapter keys, ``"feature_pipeline"`` records the features they were
    trained on (the authors' code reads only the adapter keys).

    Example:
        >>> save_adapters(model, "Brain.pth")  # doctest: +SKIP
        PosixPath('Brain.pth')
    """
    state = {**adapter_state_dict(model), ADAPTER_PIPELINE_KEY: model.feature_pipeline.value}
    return write_atomically(path, lambda name: torch.save(state, name))


def load_adapters(model: AdapterOwner, path: str | Path) -> None:
    """Load adapters saved in the authors' layout into the model (``weights_only=True``).

    Raises:
        MvfaInputError: If the file is missing or not such a checkpoint, holds NaN or infinite
            values, or its layer count or shapes do not fit the model's backbone and feature layers.

    Example:
        >>> load_adapters(model, "Brain.pth")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        checkpoint = load_tensors_safely(path, "Adapter checkpoint")
    except FileNotFoundError as error:
        raise MvfaInputError(str(error)) from error
    if not isinstance(checkpoint, dict) or not set(ADAPTER_KEYS) <= set(checkpoint):
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        msg = f"Adapter checkpoint '{path}' must hold 'seg_adapters' and 'det_adapters', found {found}."
        raise MvfaInputError(msg)
    for name in ADAPTER_KEYS:
        _check_adapter_state(model, path, name, checkpoint[name])
        for key, value in checkpoint[name].items():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                msg = (
                    f"Adapter checkpoint '{path}' holds {bad} NaN or infinite value(s) in '{name}' "
                    f"'{key}': adapters from a diverged training cannot score."
                )
                raise MvfaInputError(msg)
    for name in ADAPTER_KEYS:
        getattr(model, name).load_state_dict(checkpoint[name])
    recorded = checkpoint.get(ADAPTER_PIPELINE_KEY)
    logger.info(
        "Loaded the adapters of '%s': %d layer(s) at feature_layers=%s, trained under feature_pipeline=%s.",
        path, len(model.feature_layers), list(model.feature_layers), f"'{recorded}'" if recorded else "unrecorded",
    )  # fmt: skip
    _warn_on_pipeline_mismatch(path, recorded, model.feature_pipeline)


def _warn_on_pipeline_mismatch(path: Path, recorded: object, feature_pipeline: FeaturePipeline) -> None:
    """Warn (once per file and setting) when adapters were trained on other features than the model's."""
    trained_on = DEFAULT_FEATURE_PIPELINE if recorded is None else resolve_feature_pipeline(str(recorded))
    if trained_on == feature_pipeline:
        return
    key = (str(path.resolve()), feature_pipeline)
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
        feature_pipeline,
        trained_on,
    )


def _check_adapter_state(model: AdapterOwner, path: Path, name: str, state: object) -> None:
    """Refuse the adapter set ``name`` of a file unless its keys and shapes are the model's."""
    expected = {key: tuple(value.shape) for key, value in getattr(model, name).state_dict().items()}
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
        f"shape(s) {shapes}, but backbone '{model.backbone}' with feature_layers={model.feature_layers} "
        f"expects {len(model.feature_layers)} layer(s) with fc1 weight shape "
        f"{expected['0.fc1.0.weight']} (embed_dim x width)."
    )
    raise MvfaInputError(msg)
