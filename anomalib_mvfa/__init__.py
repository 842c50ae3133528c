"""MVFA for anomalib: multi-level visual feature adapters on a frozen CLIP.

The names below are imported on first use, so that ``import anomalib_mvfa`` (and the
``anomalib-mvfa`` command's help) do not load torch.

Layout:
    - ``torch_model``: :class:`MvfaModel`, the torch model (CLIP, adapters, both branches, fusion).
    - ``lightning_model``: :class:`Mvfa`, the anomalib module (training step, checkpoints, export).
    - ``support``: the few-shot support set (selection, augmentation, datasets) and the callback
      that serves it and builds the memory banks.
    - ``loss``, ``prompting``, ``backbone``, ``pipeline``, ``pre_processing``, ``metrics``,
      ``visualization``, ``tensor_files``: the parts the two models use.
    - ``data``: the reader of images, DICOM and NIfTI, and the datamodules (``MedicalAD``,
      ``MedicalFolder``, ``ScanFolder``).
    - ``commands``: the ``anomalib-mvfa`` command line (demo, evaluate, speed, benchmark, configs).

Example:
    >>> from anomalib_mvfa import Mvfa, MvfaModel
    >>> model = Mvfa(backbone="ViT-L-14-336", pretrained="openai", image_size=240)  # doctest: +SKIP
    >>> torch_model = MvfaModel(backbone="ViT-L-14-336", pretrained="openai", image_size=240)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backbone import PretrainedWeightsError, load_clip
    from .lightning_model import Mvfa
    from .loss import DetectionLoss, MvfaLoss
    from .support import FewShotMemoryBankCallback, SupportSet, augment_support_set
    from .torch_model import BranchOutputs, MvfaModel, TrainingOutputs

try:
    __version__ = metadata.version("anomalib-mvfa")
except metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"

# public name -> module of this package that defines it
_EXPORTS = {
    "BranchOutputs": "torch_model",
    "DetectionLoss": "loss",
    "FewShotMemoryBankCallback": "support",
    "Mvfa": "lightning_model",
    "MvfaLoss": "loss",
    "MvfaModel": "torch_model",
    "PretrainedWeightsError": "backbone",
    "SupportSet": "support",
    "TrainingOutputs": "torch_model",
    "augment_support_set": "support",
    "load_clip": "backbone",
}

__all__ = [
    "BranchOutputs",
    "DetectionLoss",
    "FewShotMemoryBankCallback",
    "Mvfa",
    "MvfaLoss",
    "MvfaModel",
    "PretrainedWeightsError",
    "SupportSet",
    "TrainingOutputs",
    "augment_support_set",
    "load_clip",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first used."""
    if name not in _EXPORTS:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Public names, for completion."""
    return sorted({*globals(), *_EXPORTS})
