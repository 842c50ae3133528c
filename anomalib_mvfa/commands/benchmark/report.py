"""The report of ``anomalib-mvfa benchmark``: every model on the same plots and the same images.

Each job leaves, in its run folder (:class:`~.jobs.Job`), one row per test image, its anomaly maps
and a pixel sample with its pixel AUROC, AUPRO and Dice. This module joins them:
``benchmark_images.csv`` (every job's rows), ``benchmark_pixels.csv`` (the pixel figures), ROC
and precision-recall curves per category with one series per model (seeds as bands), and
``benchmark_report.html``, whose gallery shows the models side by side on the images they got wrong.

Example:
    >>> write_benchmark_report(jobs, rows, Path("results/benchmark"), table_rows)  # doctest: +SKIP
    PosixPath('results/benchmark/benchmark_report.html')
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

from ...data.readers import DEFAULT_READER
from ...reports.page import TileMap
from ...reports.report import RunReport, make_tile
from ...reports.results import finite_or_none, pick_gallery
from ...utils import write_rows
from .jobs import Job

__all__ = ["GALLERY_SIZE", "write_benchmark_report"]

# images of one category's gallery at most (the union of every model's picks)
GALLERY_SIZE = 8
# what the page says first when a model ran with random weights
RANDOM_WEIGHTS_WARNING = "Random weights: speed figures only; the accuracy, the curves and the gallery mean nothing."
# the scale of the scores and maps the models leave (anomalib's post-processor's)
SCALE = "normalised"


def _category_label(row: dict[str, Any], several_data: bool) -> str:
    category = row["category"] or row["data"]
    return f"{row['data']} {category}" if several_data and row["category"] else str(category)


def _load_image(file: str, size: tuple[int, int]) -> torch.Tensor:
    """The test image read with the package's reader, resized to ``size`` for the gallery."""
    image = DEFAULT_READER.read_image(file)
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0]


def _load_mask(path: str, size: tuple[int, int]) -> torch.Tensor | None:
    if not path or not Path(path.partition("#")[0]).exists():
        return None
    mask = DEFAULT_READER.read_mask(path).float()
    return F.interpolate(mask[None, None], size=size, mode="nearest")[0, 0] > 0.5


def _map(path: str, size: tuple[int, int]) -> np.ndarray:
    values = torch.from_numpy(np.load(path).astype(np.float32))
    return F.interpolate(values[None, None], size=size, mode="bilinear")[0, 0].numpy()


def write_benchmark_report(
    jobs: list[Job],
    rows: list[dict[str, Any]],
    output: Path,
    table_rows: list[dict[str, Any]],
    random_weights: bool = False,
) -> Path | None:
    """Join the jobs' per-image files; write ``benchmark_images.csv``, the curves and the page.

    ``rows`` are the jobs' result rows, in the order of ``jobs``. Jobs that failed (or left no
    per-image file) are left out; ``None`` when none is left.
    """
    output = Path(output)
    several_data = len({row["data"] for row in rows}) > 1
    report = RunReport()
    images: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []  # pixel AUROC, AUPRO, Dice of each job with masks
    first_seed: dict[str, dict[str, pd.DataFrame]] = defaultdict(dict)  # category -> model -> rows
    for job, row in zip(jobs, rows, strict=True):
        if row.get("error") or not job.images_file.is_file():
            continue
        category, model, seed = _category_label(row, several_data), str(row["model"]), int(row["seed"])
        frame = pd.read_csv(job.images_file, keep_default_na=False)
        scores = torch.tensor(frame["score"].to_numpy(dtype=np.float64))
        labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64))
        report.add_images(category, seed, model, scores, labels)
        pixels = torch.load(job.pixels_file, weights_only=True)
        if pixels["targets"].numel():
            report.add_series(category, "pixel", seed, model, pixels["scores"], pixels["targets"])
        if pixels.get("summary"):
            summary = {"model": model, "category": category, "seed": seed, **pixels["summary"]}
            summaries.append(summary)
            report.add_summary(category, summary)
        images += [{"model": model, "data": row["data"], "category": row["category"], "seed": seed, **item}
                   for item in frame.to_dict("records")]  # fmt: skip
        if model not in first_seed[category]:
            first_seed[category][model] = frame
    if not images:
        return None
    write_rows(output / "benchmark_images.csv", images)
    if summaries:
        write_rows(output / "benchmark_pixels.csv", summaries)
    for category, frames in first_seed.items():
        _add_gallery(report, category, frames)
    notes = [
        "Scores are those anomalib's metrics see: each model's scores normalised with its validation split's "
        "threshold and range; decisions at the normalised threshold, set on the validation split, never on test labels."
    ]
    warning = RANDOM_WEIGHTS_WARNING if random_weights else None
    tables = {"Benchmark (mean ± std over seeds)": table_rows}
    return report.write(output, "benchmark_report.html", "anomalib-mvfa benchmark", tables, notes, warning)


def _add_gallery(report: RunReport, category: str, frames: dict[str, pd.DataFrame]) -> None:
    """The union of every model's worst mistakes (first seed), each image shown by every model.

    A tile's kind is the first model's that picked it (the gallery's heading names that model).
    """
    picked: dict[str, tuple[str, str]] = {}  # file -> (kind, model), in the order picked
    for model, frame in frames.items():
        threshold = _optional(frame["threshold"].iloc[0])
        scores = torch.tensor(frame["score"].to_numpy(dtype=np.float64))
        labels = torch.tensor(frame["label"].to_numpy(dtype=np.int64))
        for kind, index in pick_gallery(scores, labels, threshold):
            picked.setdefault(str(frame["file"].iloc[index]), (kind, model))
    for file, (kind, picker) in list(picked.items())[:GALLERY_SIZE]:
        views, size, label, mask_path = [], None, 0, ""
        for model, frame in frames.items():
            match = frame[frame["file"] == file]
            if match.empty or not match["map"].iloc[0]:
                continue
            entry = match.iloc[0]
            size = size or tuple(np.load(entry["map"], mmap_mode="r").shape[-2:])
            decision = None if entry["decision"] == "" else int(entry["decision"])
            views.append(
                TileMap(
                    model,
                    _map(entry["map"], size),
                    float(entry["score"]),
                    _optional(entry["threshold"]),
                    decision,
                    scale=SCALE,
                    pixel_threshold=_optional(entry.get("pixel_threshold", "")),
                )
            )
            label, mask_path = int(entry["label"]), str(entry["mask"])
        if views and size is not None:
            image = _load_image(file, size)
            mask = _load_mask(mask_path, size)
            report.add_tile(category, make_tile(kind, file, label, image, mask, views, model=picker))


def _optional(value: object) -> float | None:
    """A threshold cell of a per-image file: ``None`` when empty or NaN."""
    return None if value == "" else finite_or_none(value)
