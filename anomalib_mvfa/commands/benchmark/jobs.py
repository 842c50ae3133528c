"""One benchmark job: a model on a datamodule category with a seed, and the run folder it leaves.

Each job writes, in its run folder ``<output>/runs/<model>/<category>/seed<seed>``, anomalib's own
outputs, its anomaly maps (``maps/``), one row per test image (:attr:`Job.IMAGES_FILE`) and a pixel
sample with its pixel AUROC, AUPRO and Dice (:attr:`Job.PIXELS_FILE`); the report reads them back.

Example:
    >>> config = BenchmarkConfig(models=[{"class_path": "anomalib_mvfa.Mvfa"}],
    ...                          data=[{"class_path": "anomalib.data.MVTecAD"}], categories=["bottle"])
    >>> job = grid(config)[0]
    >>> job.describe()
    'Mvfa on MVTecAD bottle seed 0'
    >>> job.images_file.as_posix()
    'results/benchmark/runs/Mvfa/bottle/seed0/per_image.csv'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .config import BenchmarkConfig, class_name

__all__ = ["Job", "grid"]


@dataclass(frozen=True)
class Job:
    """A model entry trained and tested on a datamodule entry's ``category`` with ``seed``, writing under ``output``.

    Args:
        model: The config's model entry (``class_path``, ``init_args``).
        data: The config's datamodule entry.
        category: The datamodule's category (``None``: the entry's own).
        seed: The seed of the run.
        output: The benchmark's output folder.
    """

    # what each job leaves in its run folder for the report: one row per test image, and a pixel sample
    IMAGES_FILE: ClassVar[str] = "per_image.csv"
    PIXELS_FILE: ClassVar[str] = "pixels.pt"

    model: dict[str, Any]
    data: dict[str, Any]
    category: str | None
    seed: int
    output: Path

    @property
    def model_name(self) -> str:
        """The model's class name, such as ``Patchcore``."""
        return class_name(self.model)

    @property
    def data_name(self) -> str:
        """The datamodule's class name, such as ``MVTecAD``."""
        return class_name(self.data)

    @property
    def root(self) -> Path:
        """The run folder: ``<output>/runs/<model>/<category>/seed<seed>``."""
        return Path(self.output) / "runs" / self.model_name / str(self.category) / f"seed{self.seed}"

    @property
    def maps_dir(self) -> Path:
        """Where the job saves its anomaly maps."""
        return self.root / "maps"

    @property
    def images_file(self) -> Path:
        """The job's per-image rows (file, label, score, threshold, decision, map, mask)."""
        return self.root / self.IMAGES_FILE

    @property
    def pixels_file(self) -> Path:
        """The job's pixel sample (``scores``, ``targets``) and pixel ``summary``."""
        return self.root / self.PIXELS_FILE

    def describe(self) -> str:
        """``Mvfa on MVTecAD bottle seed 0``."""
        return f"{self.model_name} on {self.data_name} {self.category or ''} seed {self.seed}"


def grid(config: BenchmarkConfig) -> list[Job]:
    """Every model x datamodule x category x seed job of ``config``, in the order of the tables.

    Datamodules first, then categories, models and seeds, so that a model's seeds are neighbours.
    """
    return [
        Job(model, data, category, seed, Path(config.output))
        for data in config.data
        for category in config.categories
        for model in config.models
        for seed in config.seeds
    ]
