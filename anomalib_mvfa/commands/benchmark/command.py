"""The ``anomalib-mvfa benchmark`` command: its arguments and its run (see :mod:`anomalib_mvfa.commands.benchmark`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> parser.parse_args(["--config", "grid.yaml", "--workers", "2"]).workers
    2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ...distributed import launched_processes
from ...errors import MvfaInputError
from ...pipeline import add_feature_pipeline_argument
from .config import RANDOM_WEIGHTS, BenchmarkConfig
from .jobs import grid
from .report import write_benchmark_report
from .runner import run_jobs
from .tables import summary_rows, write_tables

__all__ = ["add_arguments", "run"]


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
    """Run every job and write the tables and the report; return an exit code.

    Several GPUs run several jobs at once (one device each), not one job under DDP: anomalib's
    memory-bank models (PatchCore) do not run under DDP, and a job's figures are one device's.
    Started by a multi-process launcher, every process would run every job, so it stops.

    Raises:
        MvfaInputError: If the config is missing or incomplete, names no job, or ``--workers`` is below 1.
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
    jobs = grid(config)
    if not jobs:
        msg = f"Benchmark config '{args.config}' names no job: its categories or seeds are an empty list."
        raise MvfaInputError(msg)
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
    print("\n" + write_tables(rows, output))
    print(f"tables written to {output / 'benchmark.md'} and {output / 'benchmark.csv'}")
    random_rows = any(row["weights"] == RANDOM_WEIGHTS for row in rows)
    page = write_benchmark_report(jobs, rows, output, summary_rows(rows), random_rows)
    if page is not None:
        print(f"per-image results in {output / 'benchmark_images.csv'}, curves in {output / 'curves'}, report {page}")
    return 0
