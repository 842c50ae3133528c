"""What a benchmark runs: its YAML config, the classes it names and the columns of its rows.

Light: neither torch nor anomalib is imported here.

Example:
    >>> config = BenchmarkConfig(models=[{"class_path": "anomalib.models.Patchcore"}], data=[{}])
    >>> config.seeds, config.output
    ([0], 'results/benchmark')
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...errors import MvfaInputError

__all__ = [
    "METRICS",
    "RANDOM_WEIGHTS",
    "STUDY_METRIC",
    "BenchmarkConfig",
    "check_class_paths",
    "class_name",
    "load_class",
    "shown_metrics",
    "weights_label",
]

# the figures of every row, averaged over seeds in the tables
METRICS = ("image_AUROC", "pixel_AUROC", "image_F1Score", "fit_seconds", "images_per_second", "peak_memory_mb")
# AUROC of the study scores (the highest slice score) of volumes (NIfTI files, DICOM series): a column of the
# tables only where some job's test split held volumes (shown_metrics)
STUDY_METRIC = "study_AUROC"


def shown_metrics(rows: list[dict[str, Any]]) -> tuple[str, ...]:
    """:data:`METRICS`, with :data:`STUDY_METRIC` after the pixel AUROC where a row has it or says why it is undefined.

    Example:
        >>> shown_metrics([{"study_AUROC": None}])[:3], shown_metrics([{"study_AUROC": 0.9}])[:3]
        (('image_AUROC', 'pixel_AUROC', 'image_F1Score'), ('image_AUROC', 'pixel_AUROC', 'study_AUROC'))
    """
    studies = any(row.get(STUDY_METRIC) not in (None, "") or STUDY_METRIC in str(row.get("undefined")) for row in rows)
    return (*METRICS[:2], STUDY_METRIC, *METRICS[2:]) if studies else METRICS


# the weights label of rows whose accuracy means nothing
RANDOM_WEIGHTS = "random (accuracy not meaningful)"


@dataclass
class BenchmarkConfig:
    """What to run; see :mod:`anomalib_mvfa.commands.benchmark`."""

    models: list[dict[str, Any]]
    data: list[dict[str, Any]]
    categories: list[str | None] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    random_weights: bool = False
    output: str = "results/benchmark"
    feature_pipeline: str | None = None  # for models that take one and whose init_args do not set it
    study_labels: str | None = None  # CSV of the volumes' labels (anomalib_mvfa.studies.read_study_labels)

    @classmethod
    def from_file(cls, path: str | Path) -> BenchmarkConfig:
        """Read and check a YAML config.

        Raises:
            MvfaInputError: If the file is missing, lacks ``models`` or ``data``, or names a class that
                is not an anomalib model (``models``) or datamodule (``data``).
        """
        path = Path(path)
        if not path.is_file():
            msg = f"Benchmark config '{path}' does not exist."
            raise MvfaInputError(msg)
        content = yaml.safe_load(path.read_text()) or {}
        missing = [key for key in ("models", "data") if not content.get(key)]
        if missing:
            msg = f"Benchmark config '{path}' needs the lists {missing} (entries with class_path and init_args)."
            raise MvfaInputError(msg)
        config = cls(**content)
        check_class_paths(config)  # before any job makes anything
        return config


def class_name(entry: Mapping[str, Any]) -> str:
    """The class name of a config entry, without importing it.

    Example:
        >>> class_name({"class_path": "anomalib.models.Patchcore"})
        'Patchcore'
    """
    return str(entry["class_path"]).rsplit(".", 1)[-1]


def weights_label(settings: Mapping[str, Any], random_weights: bool) -> str:
    """A row's weights label, from the model's own settings (its ``hparams``, or the entry's ``init_args``).

    Random when ``--random-weights`` (or the config's ``random_weights``) is set, or when the
    model was configured without pretrained weights (Mvfa ``pretrained: null``, PatchCore
    ``pre_trained: false``).

    Example:
        >>> weights_label({"pretrained": None}, random_weights=False)
        'random (accuracy not meaningful)'
    """
    configured_random = ("pretrained" in settings and settings["pretrained"] is None) or settings.get(
        "pre_trained"
    ) is False
    return RANDOM_WEIGHTS if random_weights or configured_random else "pretrained"


def load_class(class_path: str, kind: str = "model") -> type:
    """Import ``package.module.Class`` (or ``package.Class``): an anomalib model or datamodule class.

    As anomalib's own command line, only ``AnomalibModule`` subclasses are models and only
    ``AnomalibDataModule`` subclasses datamodules: anything else is refused after its module is
    imported and before anything is made (a config must not call ``os.system``, say).

    Args:
        class_path: Dotted path of the class.
        kind: ``"model"`` or ``"datamodule"``.

    Raises:
        MvfaInputError: If the module or the class cannot be imported, or it is not of ``kind``.

    Example:
        >>> load_class("anomalib.models.Patchcore").__name__
        'Patchcore'
        >>> load_class("os.system")
        Traceback (most recent call last):
        ...
        anomalib_mvfa.errors.MvfaInputError: class_path 'os.system' is not an anomalib model ...
    """
    from anomalib.data import AnomalibDataModule  # noqa: PLC0415 - heavy: only when a class is loaded
    from anomalib.models import AnomalibModule  # noqa: PLC0415

    bases = {"model": AnomalibModule, "datamodule": AnomalibDataModule}
    module, _, name = str(class_path).rpartition(".")
    try:
        loaded = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        msg = f"Cannot import '{class_path}': {error}"
        raise MvfaInputError(msg) from error
    base = bases[kind]
    if not (isinstance(loaded, type) and issubclass(loaded, base)):
        msg = (
            f"class_path '{class_path}' is not an anomalib {kind} (a subclass of {base.__module__}.{base.__name__}): "
            "a benchmark config makes only models and datamodules, as anomalib's command line does."
        )
        raise MvfaInputError(msg)
    return loaded


def check_class_paths(config: BenchmarkConfig) -> None:
    """Load every ``class_path`` of ``config`` (:func:`load_class`): models as models, data as datamodules.

    Raises:
        MvfaInputError: Naming the first entry that cannot be imported or is not of its kind.
    """
    for kind, entries in (("model", config.models), ("datamodule", config.data)):
        for entry in entries:
            if isinstance(entry, Mapping) and "class_path" in entry:
                load_class(entry["class_path"], kind)
