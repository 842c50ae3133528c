"""Benchmark MVFA beside any anomalib model: ``anomalib-mvfa benchmark --config <file>.yaml``.

The config names models and datamodules by class path (so any anomalib model works, without
anomalib's model whitelist), categories and seeds. Every model x datamodule x category x seed
job trains and tests through anomalib's Engine; the command writes a CSV of all jobs and a
Markdown table with mean and standard deviation over seeds of image AUROC, pixel AUROC, image F1,
fit seconds, inference images per second and peak memory.

Every job runs in a new process of its own, so that no job changes what the next one measures and
the peak-memory column is the job's own (``--in-process`` runs them in this process instead). Jobs
run one after another on a CPU or a single GPU; with several GPUs, one job per GPU at a time
(``--workers`` sets how many run at once). A job that fails, its process killed for lack of memory
included, gets a row that says so, and the other jobs still run.

``random_weights: true`` runs every model offline on random weights (Mvfa ``pretrained=None``,
PatchCore ``pre_trained=False``, WinCLIP without its download): for speed studies only, and the
rows say that their accuracy means nothing.

Example config::

    models:
      - class_path: anomalib_mvfa.Mvfa
        init_args: {backbone: ViT-B-16, image_size: 224, feature_layers: [3, 6, 9, 12], epochs: 5}
      - class_path: anomalib.models.Patchcore
      - class_path: anomalib.models.WinClip
        init_args: {k_shot: 4}
    data:
      - class_path: anomalib.data.MVTecAD
        init_args: {root: datasets/MVTecAD, val_split_mode: from_test}
    categories: [bottle]
    seeds: [0, 1, 2]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import importlib
import inspect
import io
import logging
import math
import multiprocessing
import os
import queue
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from anomalib.engine import Engine

from ..distributed import launched_processes
from ..errors import MvfaInputError
from ..metrics import undefined_auroc_reason
from ..pipeline import add_feature_pipeline_argument
from ..reports.recorder import TestRecorder
from ..reports.results import write_rows
from ..utils import write_atomically
from .benchmark_report import IMAGES_FILE, PIXELS_FILE, job_root, write_benchmark_report
from .progress import on_terminal, overall_bar, say

logger = logging.getLogger(__name__)

# glibc's mallopt parameter for the mmap threshold, and its initial value (see fix_mmap_threshold).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
METRICS = ("image_AUROC", "pixel_AUROC", "image_F1Score", "fit_seconds", "images_per_second", "peak_memory_mb")


@dataclass
class BenchmarkConfig:
    """What to run; see the module docstring."""

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
            ValueError: If the file is missing or lacks ``models`` or ``data``.
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


RANDOM_WEIGHTS = "random (accuracy not meaningful)"


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
    """Import ``package.module.Class`` (or ``package.Class``)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        msg = f"Cannot import '{class_path}': {error}"
        raise MvfaInputError(msg) from error


@contextmanager
def _winclip_without_download() -> Iterator[None]:
    """WinCLIP's torch model downloads fixed weights on construction; random weights here."""
    from anomalib.models.image.winclip import torch_model  # noqa: PLC0415  # only for WinCLIP rows

    saved = torch_model.PRETRAINED
    torch_model.PRETRAINED = None
    try:
        yield
    finally:
        torch_model.PRETRAINED = saved


def build_model(entry: dict[str, Any], random_weights: bool, seed: int, feature_pipeline: str | None = None) -> Any:
    """Instantiate a model entry; with ``random_weights`` switch off every pretrained download.

    ``feature_pipeline`` applies to models that take one (Mvfa) unless their ``init_args`` set it.
    Every model that takes a ``visualizer`` gets :class:`~anomalib_mvfa.visualization.MvfaVisualizer`
    unless its ``init_args`` set one: anomalib's own opens images with PIL, which cannot show 16-bit
    images right nor open DICOM or NIfTI samples, so PatchCore or WinCLIP beside Mvfa on scans would
    stop at their first visualisation.
    """
    from ..visualization import MvfaVisualizer  # noqa: PLC0415

    model_class = load_class(entry["class_path"])
    init_args = dict(entry.get("init_args") or {})
    if "visualizer" in _init_parameters(model_class):
        init_args.setdefault("visualizer", MvfaVisualizer())
    if "seed" in _init_parameters(model_class):
        init_args.setdefault("seed", seed)
    if feature_pipeline is not None and "feature_pipeline" in _init_parameters(model_class):
        init_args.setdefault("feature_pipeline", feature_pipeline)
    if not random_weights:
        return model_class(**init_args)
    for name in ("pretrained", "pre_trained"):
        if name in _init_parameters(model_class):
            init_args[name] = None if name == "pretrained" else False
    if model_class.__name__ == "WinClip":
        with _winclip_without_download():
            return model_class(**init_args)
    return model_class(**init_args)


def _init_parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


class PeakMemory:
    """Peak resident memory of this process (CPU) or peak allocated GPU memory during a block, in MB."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _resident_mb() -> float:
        with Path("/proc/self/statm").open() as file:
            pages = int(file.read().split()[1])
        return pages * 4096 / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._resident_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        """Start sampling."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop sampling; on a GPU report the peak allocated GPU memory instead."""
        self._stop.set()
        self._thread.join()
        if torch.cuda.is_available():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20


def fix_mmap_threshold(size: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Keep glibc's allocator from raising its mmap threshold; return whether it could be set.

    glibc serves a large block from the heap instead of mapping it once its threshold has risen,
    and it raises the threshold (up to 32 MiB) whenever such a block is freed. anomalib's
    k-center-greedy coreset (PatchCore, ``memory_bank_ratio`` of Mvfa) frees an N x k temporary
    every step and keeps a small index tensor alive, which pins the freed holes: with fewer than
    about 32 training images the heap then grows by megabytes a step until memory runs out,
    depending on what ran in the process before. A fixed threshold (glibc's initial 128 KiB) maps
    every such temporary and returns it on free.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: nothing to fix
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, size))


def run_job(model_entry: dict, data_entry: dict, category: str | None, seed: int, config: BenchmarkConfig) -> dict:
    """Train and test one model on one datamodule category with one seed; return its row."""
    fix_mmap_threshold()
    model_name = model_entry["class_path"].rsplit(".", 1)[1]
    data_class = load_class(data_entry["class_path"])
    data_args = dict(data_entry.get("init_args") or {})
    if category is not None:
        data_args["category"] = category
    data_args.setdefault("seed", seed)
    torch.manual_seed(seed)
    root = job_root((model_entry, data_entry, category, seed), config)
    recorder = TestRecorder(maps_dir=root / "maps", seed=seed)
    with PeakMemory() as memory:
        model = build_model(model_entry, config.random_weights, seed, config.feature_pipeline)
        datamodule = data_class(**data_args)
        engine = Engine(
            default_root_dir=root, devices=1, logger=False, callbacks=[recorder], enable_progress_bar=on_terminal()
        )
        started = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        test_seconds = time.perf_counter() - started
    pipeline = getattr(model, "feature_pipeline", None)
    accuracy, undefined = _defined_aurocs(results, datamodule)
    pixels = {"scores": recorder.pixel_scores, "targets": recorder.pixel_targets, "summary": recorder.pixel_summary()}
    recorder.save_maps()
    write_rows(root / IMAGES_FILE, recorder.rows)
    write_atomically(root / PIXELS_FILE, lambda path: torch.save(pixels, path))
    return {
        "model": model_name if pipeline is None else f"{model_name} ({pipeline})",
        "data": data_class.__name__,
        "category": category,
        "seed": seed,
        **accuracy,
        "image_F1Score": results.get("image_F1Score"),
        "fit_seconds": fit_seconds,
        "images_per_second": len(datamodule.test_data) / test_seconds,
        "peak_memory_mb": memory.peak_mb,
        "weights": weights_label(getattr(model, "hparams", {}), config.random_weights),
        "undefined": "; ".join(undefined),
        "error": "",
    }


def _defined_aurocs(results: dict[str, Any], datamodule: Any) -> tuple[dict[str, float | None], list[str]]:
    """Image and pixel AUROC of a test run, ``None`` where undefined, and the reasons.

    Image AUROC is undefined when the test split holds one label only (anomalib's metric then
    reports 0.0 for most models); either AUROC is undefined where the metric returned NaN (Mvfa's
    metrics do so, with the reason in the log).
    """
    values: dict[str, float | None] = {key: results.get(key) for key in ("image_AUROC", "pixel_AUROC")}
    reasons = []
    samples = getattr(getattr(datamodule, "test_data", None), "samples", None)
    labels = torch.tensor(samples.label_index.tolist()) if samples is not None and "label_index" in samples else None
    reason = None if labels is None else undefined_auroc_reason(labels, "image_AUROC")
    if reason is not None:
        values["image_AUROC"] = None
        reasons.append(reason)
    for key, value in values.items():
        if value is not None and math.isnan(float(value)):
            values[key] = None
            reasons.append(f"{key} is undefined: the metric returned NaN (one class only among its targets)")
    return values, reasons


def summary_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per model, data and category: the seeds that ran and each metric's mean ± std, as text."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["data"], row["category"], row["weights"]), []).append(row)
    summary = []
    for (model, data, category, weights), group in groups.items():
        cells = {"model": model, "data": data, "category": str(category)}
        cells["seeds"] = str(sum(not row.get("error") for row in group))
        for metric in METRICS:
            values = [float(row[metric]) for row in group if row[metric] not in (None, "")]
            if not values:
                undefined = any(metric in str(row.get("undefined", "")) for row in group)
                cells[metric] = "" if undefined else "-"
                continue
            spread = f" ± {statistics.stdev(values):.3g}" if len(values) > 1 else ""
            cells[metric] = f"{statistics.fmean(values):.4g}{spread}"
        cells["weights"] = weights
        summary.append(cells)
    return summary


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per model, data and category, mean ± std over seeds."""
    header = ["model", "data", "category", "seeds", *METRICS, "weights"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(cells[key] for key in header) + " |" for cells in summary_rows(rows)]
    reasons = sorted({reason for row in rows for reason in str(row.get("undefined") or "").split("; ") if reason})
    if reasons:
        lines += ["", "Empty cells (and means over fewer seeds): undefined metrics, left out. " + "; ".join(reasons)]
    failures = [f"{describe_row(row)}: {row['error']}" for row in rows if row.get("error")]
    if failures:
        lines += ["", "Failed jobs (left out of the means): " + "; ".join(failures)]
    return "\n".join(lines) + "\n"


Job = tuple[dict[str, Any], dict[str, Any], str | None, int]


def describe_row(row: dict[str, Any]) -> str:
    """``Mvfa on MVTecAD bottle seed 0`` for a result row."""
    return f"{row['model']} on {row['data']} {row['category'] or ''} seed {row['seed']}"


def describe(job: Job) -> str:
    """``Mvfa on MVTecAD bottle seed 0``."""
    model, data, category, seed = job
    model_name, data_name = (entry["class_path"].rsplit(".", 1)[1] for entry in (model, data))
    return f"{model_name} on {data_name} {category or ''} seed {seed}"


def _bind_device(device: int | None) -> None:
    """Job process initialiser: see only GPU ``device`` (``None``: no GPU binding)."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)


def _print_metrics(row: dict[str, Any]) -> None:
    if row.get("error"):
        say(f"    FAILED: {row['error']}")
        return
    say("    " + ", ".join(f"{m} {row[m]:.4g}" for m in METRICS if row[m] is not None))


def failed_row(job: Job, config: BenchmarkConfig, error: BaseException) -> dict[str, Any]:
    """The row of a job that failed: its names, no figures, and what went wrong."""
    model, data, category, seed = job
    if isinstance(error, BrokenProcessPool):
        reason = "its process died (killed by the system, for example for lack of memory)"
    else:
        reason = f"{type(error).__name__}: {error}"
    return {
        "model": model["class_path"].rsplit(".", 1)[1],
        "data": data["class_path"].rsplit(".", 1)[1],
        "category": category,
        "seed": seed,
        **dict.fromkeys(METRICS),
        "weights": weights_label(model.get("init_args") or {}, config.random_weights),
        "undefined": "",
        "error": reason.splitlines()[0][:300],
    }


def _run_isolated(job: Job, config: BenchmarkConfig, device: int | None) -> dict[str, Any]:
    """Run ``job`` in a new process of its own (spawned: CUDA cannot be shared with forked processes)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=_bind_device, initargs=(device,)) as pool:
        return pool.submit(run_job, *job, config).result()


def run_jobs(
    jobs: list[Job], config: BenchmarkConfig, workers: int, gpus: int, isolate: bool = True
) -> list[dict[str, Any]]:
    """Rows of all ``jobs`` in grid order, ``workers`` at a time.

    With ``isolate`` (default) every job runs in a new process of its own, so that no job can
    change what the next one measures (memory, global settings) and the peak-memory column is the
    job's own; worker slot ``i`` binds its jobs to GPU ``i % gpus``. Without, jobs run one after
    another in this process. A job that fails, its process killed included, gets a row that says
    so, and the other jobs still run.
    """
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    slots: queue.Queue[int | None] = queue.Queue()
    for worker in range(max(workers, 1)):
        slots.put(worker % gpus if gpus else None)

    def run_one(number: int) -> None:
        job = jobs[number - 1]
        device = slots.get()
        try:
            where = f" (GPU {device})" if device is not None else ""
            say(f"[{number}/{len(jobs)}] {describe(job)}{where}")
            try:
                rows[number - 1] = _run_isolated(job, config, device) if isolate else run_job(*job, config)
            except Exception as error:  # reported in the job's row; the other jobs go on
                logger.exception("Benchmark job %s failed", describe(job))
                rows[number - 1] = failed_row(job, config, error)
            _print_metrics(rows[number - 1])
            bar.update()
        finally:
            slots.put(device)

    with overall_bar(len(jobs), "benchmark") as bar:
        if not isolate or workers <= 1:
            for number in range(1, len(jobs) + 1):
                run_one(number)
        else:
            with ThreadPoolExecutor(workers) as threads:
                list(threads.map(run_one, range(1, len(jobs) + 1)))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa benchmark``."""
    parser.add_argument("--config", required=True, help="YAML file with models, data, categories, seeds")
    parser.add_argument("--random-weights", action="store_true", help="offline, random weights for every model")
    parser.add_argument("--output", default=None, help="overrides the config's output folder")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel worker processes; default: one per GPU when several exist"
    )
    add_feature_pipeline_argument(parser, "the config's feature_pipeline, else each model's own (Mvfa: authors)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the jobs one after another in this process instead of a new process each (faster to start; "
        "a job can then affect the next one's memory figures)",
    )


def run(args: argparse.Namespace) -> int:
    """Run every job and write the tables; return an exit code.

    Several GPUs run several jobs at once (one device each), not one job under DDP: anomalib's
    memory-bank models (PatchCore) do not run under DDP, and a job's figures are one device's.
    Started by a multi-process launcher, every process would run every job, so it stops.
    """
    processes = launched_processes()
    if processes > 1:
        print(
            f"error: anomalib-mvfa benchmark was started as {processes} processes (torchrun, srun or a DDP "
            "launcher); start it once: it runs one job per GPU at a time itself (--workers)."
        )
        return 2
    config = BenchmarkConfig.from_file(args.config)
    config.random_weights = config.random_weights or args.random_weights
    config.output = args.output or config.output
    config.feature_pipeline = args.feature_pipeline or config.feature_pipeline
    jobs: list[Job] = [
        (model, data, category, seed)
        for data in config.data
        for category in config.categories
        for model in config.models
        for seed in config.seeds
    ]
    gpus = torch.cuda.device_count()
    workers = args.workers if args.workers is not None else (gpus if gpus > 1 else 1)
    if workers < 1:
        msg = f"--workers must be at least 1, got {workers}."
        raise MvfaInputError(msg)
    where = f"{gpus} GPU(s)" if gpus else "CPU"
    how = "in this process" if args.in_process else f"{min(workers, len(jobs))} at a time, each in its own process"
    print(f"{len(jobs)} job(s) on {where}, {how}")
    rows = run_jobs(jobs, config, min(workers, len(jobs)), gpus, isolate=not args.in_process)
    output = Path(config.output)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(output / "benchmark.csv", lambda path: Path(path).write_text(buffer.getvalue()))
    table = summary_table(rows)
    random_rows = any(row["weights"] == RANDOM_WEIGHTS for row in rows)
    note = "\nRandom weights: speed figures only, their accuracy columns mean nothing.\n" if random_rows else ""
    write_atomically(output / "benchmark.md", lambda path: Path(path).write_text(table + note))
    print("\n" + table + note)
    print(f"tables written to {output / 'benchmark.md'} and {output / 'benchmark.csv'}")
    page = write_benchmark_report(jobs, rows, config, summary_rows(rows), random_rows)
    if page is not None:
        print(f"per-image results in {output / 'benchmark_images.csv'}, curves in {output / 'curves'}, report {page}")
    return 0
