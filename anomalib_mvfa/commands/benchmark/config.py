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

__all__ = ["METRICS", "RANDOM_WEIGHTS", "BenchmarkConfig", "class_name", "load_class", "weights_label"]

# the figures of every row, averaged over seeds in the tables
METRICS = ("image_AUROC", "pixel_AUROC", "image_F1Score", "fit_seconds", "images_per_second", "peak_memory_mb")
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

    @classmethod
    def from_file(cls, path: str | Path) -> BenchmarkConfig:
        """Read and check a YAML config.

        Raises:
            MvfaInputError: If the file is missing or lacks ``models`` or ``data``.
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
        return cls(**content)


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


def load_class(class_path: str) -> type:
    """Import ``package.module.Class`` (or ``package.Class``).

    Raises:
        MvfaInputError: If the module or the class cannot be imported.

    Example:
        >>> load_class("pathlib.Path").__name__
        'Path'
    """
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        msg = f"Cannot import '{class_path}': {error}"
        raise MvfaInputError(msg) from error
