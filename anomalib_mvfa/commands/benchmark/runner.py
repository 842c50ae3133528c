"""Running benchmark jobs: each trains and tests one model through anomalib's Engine and returns its row.

Every job runs in a new process of its own by default (spawned, bound to one GPU where there are
several), so that no job changes what the next one measures and the peak-memory column is the job's
own. A job that fails, its process killed for lack of memory included, gets a row that says so.

Example:
    >>> rows = run_jobs(grid(config), config, workers=1, gpus=0)  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import math
import multiprocessing
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine

from ..._compat import winclip_without_pretrained_weights
from ...metrics import undefined_auroc_reason
from ...reports.recorder import TestRecorder
from ...studies import has_volumes, read_study_labels, study_auroc, study_auroc_reason, study_results
from ...utils import write_atomically, write_rows
from ..options import preset_init_args
from ..progress import on_terminal, overall_bar, say
from .config import METRICS, STUDY_METRIC, BenchmarkConfig, load_class, shown_metrics, weights_label
from .jobs import Job

__all__ = [
    "JobFailedError",
    "JobProcessDiedError",
    "JobProcesses",
    "PeakMemory",
    "build_model",
    "failed_row",
    "fix_mmap_threshold",
    "run_job",
    "run_jobs",
]

logger = logging.getLogger(__name__)

# glibc's mallopt parameter for the mmap threshold, and its initial value (see fix_mmap_threshold).
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def build_model(entry: dict[str, Any], random_weights: bool, seed: int, feature_pipeline: str | None = None) -> Any:
    """Instantiate a model entry; with ``random_weights`` switch off every pretrained download.

    A backbone with a preset (``backbone: tiny-random``) brings its settings (random weights, image
    size, feature layers; :data:`~anomalib_mvfa.commands.options.BACKBONE_PRESETS`) where ``init_args``
    set none.

    ``feature_pipeline`` applies to models that take one (Mvfa) unless their ``init_args`` set it.
    Every model that takes a ``visualizer`` gets :class:`~anomalib_mvfa.visualization.MvfaVisualizer`
    unless its ``init_args`` set one: anomalib's own opens images with PIL, which cannot show 16-bit
    images right nor open DICOM or NIfTI samples, so PatchCore or WinCLIP beside Mvfa on scans would
    stop at their first visualisation.
    """
    from ...visualization import MvfaVisualizer  # noqa: PLC0415

    model_class = load_class(entry["class_path"])
    init_args = preset_init_args(dict(entry.get("init_args") or {}))
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
    if model_class.__name__ == "WinClip":  # WinCLIP downloads fixed weights on construction
        with winclip_without_pretrained_weights():
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
    def resident_mb() -> float:
        """Resident memory of this process now, in MB."""
        with Path("/proc/self/statm").open() as file:
            pages = int(file.read().split()[1])
        return pages * 4096 / 2**20

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.resident_mb())
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


def run_job(job: Job, config: BenchmarkConfig) -> dict[str, Any]:
    """Train and test ``job``'s model on its datamodule category with its seed; return its row.

    The job's run folder receives anomalib's outputs, the anomaly maps, the per-image rows and the
    pixel sample (see :class:`~.jobs.Job`).
    """
    fix_mmap_threshold()
    data_class = load_class(job.data["class_path"], "datamodule")
    data_args = dict(job.data.get("init_args") or {})
    if job.category is not None:
        data_args["category"] = job.category
    data_args.setdefault("seed", job.seed)
    torch.manual_seed(job.seed)
    recorder = TestRecorder(maps_dir=job.maps_dir, seed=job.seed)
    with PeakMemory() as memory:
        model = build_model(job.model, config.random_weights, job.seed, config.feature_pipeline)
        datamodule = data_class(**data_args)
        engine = Engine(
            default_root_dir=job.root, devices=1, logger=False, callbacks=[recorder], enable_progress_bar=on_terminal()
        )
        started = time.perf_counter()
        engine.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        started = time.perf_counter()
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
        test_seconds = time.perf_counter() - started
    pipeline = getattr(model, "feature_pipeline", None)
    accuracy, undefined = _defined_aurocs(results, datamodule)
    study_labels = read_study_labels(config.study_labels) if config.study_labels else None
    accuracy[STUDY_METRIC], reason = study_auroc_of_rows(recorder.rows, datamodule, study_labels)
    undefined += [reason] if reason else []
    pixels = {"scores": recorder.pixel_scores, "targets": recorder.pixel_targets, "summary": recorder.pixel_summary()}
    recorder.save_maps()
    write_rows(job.images_file, recorder.rows)
    write_atomically(job.pixels_file, lambda path: torch.save(pixels, path))
    return {
        "model": job.model_name if pipeline is None else f"{job.model_name} ({pipeline})",
        "data": data_class.__name__,
        "category": job.category,
        "seed": job.seed,
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


def study_auroc_of_rows(
    rows: list[dict[str, Any]], datamodule: Any, study_labels: Mapping[str, int] | None = None
) -> tuple[float | None, str | None]:
    """AUROC of the study scores (highest slice score) of the test rows, and why it is undefined.

    Each row gains its ``study`` and ``slice`` (from the test split's samples table, the file itself
    where there is none). ``(None, None)`` where no study holds several slices (2D images only: the
    image AUROC says it all). A study is abnormal when any of its rows is, or as ``study_labels``
    (the config's ``study_labels`` file, :func:`~anomalib_mvfa.studies.read_study_labels`) says.
    """
    samples = getattr(getattr(datamodule, "test_data", None), "samples", None)
    identities = {}
    if samples is not None and "study" in samples:
        columns = (samples[column] for column in ("image_path", "study", "slice"))
        identities = {str(name): (str(study), int(index)) for name, study, index in zip(*columns, strict=True)}
    for row in rows:
        row["study"], row["slice"] = identities.get(str(row["file"]), (str(row["file"]), 0))
    studies = [str(row["study"]) for row in rows]
    if not has_volumes(studies):
        return None, None
    scores, labels = [row["score"] for row in rows], [row["label"] for row in rows]
    results = study_results(studies, scores, labels, study_labels=study_labels)
    reason = study_auroc_reason(results)
    if reason is not None:
        return None, reason.replace("study AUROC", "study_AUROC")
    return study_auroc(results), None


def _bind_device(device: int | None) -> None:
    """Job process initialiser: see only GPU ``device`` (``None``: no GPU binding)."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)


def _print_metrics(row: dict[str, Any]) -> None:
    if row.get("error"):
        say(f"    FAILED: {row['error']}")
        return
    say("    " + ", ".join(f"{m} {row[m]:.4g}" for m in shown_metrics([row]) if row[m] is not None))


class JobFailedError(RuntimeError):
    """A job failed in its own process; the message is the process's ``<exception type>: <message>``."""


class JobProcessDiedError(RuntimeError):
    """A job's process ended without a row (killed by the system, for example for lack of memory)."""


def failed_row(job: Job, config: BenchmarkConfig, error: BaseException) -> dict[str, Any]:
    """The row of a job that failed: its names, no figures, and what went wrong (the whole message, on one line)."""
    if isinstance(error, JobProcessDiedError):
        reason = f"its process died (killed by the system, for example for lack of memory; {error})"
    elif isinstance(error, JobFailedError):
        reason = str(error)
    else:
        reason = f"{type(error).__name__}: {error}"
    return {
        "model": job.model_name,
        "data": job.data_name,
        "category": job.category,
        "seed": job.seed,
        **dict.fromkeys(METRICS),
        STUDY_METRIC: None,
        "weights": weights_label(preset_init_args(job.model.get("init_args") or {}), config.random_weights),
        "undefined": "",
        "error": " ".join(reason.split()),
    }


def _job_process(connection: Connection, job: Job, config: BenchmarkConfig, device: int | None) -> None:
    """Body of a job's process: run the job and send back its row, or what went wrong."""
    _bind_device(device)
    try:
        connection.send(("row", run_job(job, config)))
    except Exception as error:  # reported in the job's row by the benchmark's process
        traceback.print_exc()
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


class JobProcesses:
    """The job processes running now, and the benchmark's SIGTERM and SIGINT handling.

    A signal stops the benchmark: every job process is killed (Lightning's trainer in a job process
    ignores SIGTERM, so it would outlive the benchmark), no further job starts, and the benchmark's
    process exits with ``128 + signal``.
    """

    def __init__(self) -> None:
        self.running: set[multiprocessing.process.BaseProcess] = set()
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def start(self, process: multiprocessing.process.BaseProcess) -> bool:
        """Start ``process`` unless the benchmark is stopping; return whether it started."""
        with self.lock:
            if self.stopped.is_set():
                return False
            process.start()
            self.running.add(process)
            return True

    def finished(self, process: multiprocessing.process.BaseProcess) -> None:
        """Forget a process that ended."""
        with self.lock:
            self.running.discard(process)

    def stop(self) -> None:
        """Kill every job process and let no other start."""
        with self.lock:
            self.stopped.set()
            for process in self.running:
                process.kill()
            for process in self.running:
                process.join(timeout=10)

    @contextmanager
    def ended_by_signals(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGINT kill the job processes and exit (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def end(signum: int, frame: object) -> None:
            del frame
            self.stop()
            say(f"benchmark stopped by {signal.Signals(signum).name}: its job processes were ended")
            raise SystemExit(128 + signum)

        previous = {signum: signal.signal(signum, end) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _run_isolated(job: Job, config: BenchmarkConfig, device: int | None, processes: JobProcesses) -> dict[str, Any]:
    """Run ``job`` in a new process of its own (spawned: CUDA cannot be shared with forked processes).

    Raises:
        JobFailedError: If the job raised an exception in its process.
        JobProcessDiedError: If the process ended without a row (killed, or the benchmark is stopping).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_job_process, args=(sender, job, config, device), name=f"job {job.describe()}")
    try:
        if not processes.start(process):
            raise JobProcessDiedError("the benchmark is stopping")
        sender.close()  # the job's process holds the only sending end: its end is this end's EOF
        try:
            kind, value = receiver.recv()
        except EOFError:
            kind, value = "died", None
        process.join()
    finally:
        processes.finished(process)
        receiver.close()
    if kind == "row":
        return value
    if kind == "error":
        raise JobFailedError(value)
    raise JobProcessDiedError(f"exit code {process.exitcode}")


def run_jobs(
    jobs: list[Job], config: BenchmarkConfig, workers: int, gpus: int, isolate: bool = True
) -> list[dict[str, Any]]:
    """Rows of all ``jobs`` in grid order, ``workers`` at a time.

    With ``isolate`` (default) every job runs in a new process of its own, so that no job can
    change what the next one measures (memory, global settings) and the peak-memory column is the
    job's own; worker slot ``i`` binds its jobs to GPU ``i % gpus``. Without, jobs run one after
    another in this process. A job that fails, its process killed included, gets a row that says
    so, and the other jobs still run. SIGTERM or SIGINT ends every job process and this one
    (:class:`JobProcesses`).
    """
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    slots: queue.Queue[int | None] = queue.Queue()
    for worker in range(max(workers, 1)):
        slots.put(worker % gpus if gpus else None)
    processes = JobProcesses()

    def run_one(number: int) -> None:
        if processes.stopped.is_set():
            return
        job = jobs[number - 1]
        device = slots.get()
        try:
            where = f" (GPU {device})" if device is not None else ""
            say(f"[{number}/{len(jobs)}] {job.describe()}{where}")
            try:
                rows[number - 1] = _run_isolated(job, config, device, processes) if isolate else run_job(job, config)
            except Exception as error:  # reported in the job's row; the other jobs go on
                logger.exception("Benchmark job %s failed", job.describe())
                rows[number - 1] = failed_row(job, config, error)
            _print_metrics(rows[number - 1])
            bar.update()
        finally:
            slots.put(device)

    with overall_bar(len(jobs), "benchmark") as bar, processes.ended_by_signals():
        if not isolate or workers <= 1:
            for number in range(1, len(jobs) + 1):
                run_one(number)
        else:
            with ThreadPoolExecutor(workers) as threads:
                list(threads.map(run_one, range(1, len(jobs) + 1)))
    return rows
