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
import sys

import torch

from ...distributed import launched_processes
from ...errors import MvfaInputError
from ...studies import read_study_labels
from ..options import benchmark as add_arguments
from ..run_folder import new_run_folder
from .config import RANDOM_WEIGHTS, BenchmarkConfig
from .jobs import grid
from .report import write_benchmark_report
from .runner import run_jobs
from .tables import summary_rows, write_tables

__all__ = ["add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    """Run every job and write the tables and the report into a new run folder; return an exit code.

    The run folder is a new version folder under ``--output`` (or the config's ``output``): ``v0``,
    ``v1``, ..., with ``latest`` pointing at the newest (:mod:`~anomalib_mvfa.commands.run_folder`).
    The exit code is 1 when any job failed (the table names them), 0 otherwise.

    Several GPUs run several jobs at once (one device each), not one job under DDP: anomalib's
    memory-bank models (PatchCore) do not run under DDP, and a job's figures are one device's.
    Started by a multi-process launcher, every process would run every job, so it stops.

    Raises:
        MvfaInputError: If the config is missing or incomplete, names no job, its study labels file cannot
            be read, or ``--workers`` is below 1.
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
    config.feature_pipeline = args.feature_pipeline or config.feature_pipeline
    config.study_labels = args.study_labels or config.study_labels
    if config.study_labels:
        read_study_labels(config.study_labels)  # a bad labels file stops the command before any job
    if not grid(config):
        msg = f"Benchmark config '{args.config}' names no job: its categories or seeds are an empty list."
        raise MvfaInputError(msg)
    gpus = torch.cuda.device_count()
    workers = args.workers if args.workers is not None else (gpus if gpus > 1 else 1)
    if workers < 1:
        msg = f"--workers must be at least 1, got {workers}."
        raise MvfaInputError(msg)
    output = new_run_folder(args.output or config.output)
    config.output = str(output)
    jobs = grid(config)
    where = f"{gpus} GPU(s)" if gpus else "CPU"
    how = "in this process" if args.in_process else f"{min(workers, len(jobs))} at a time, each in its own process"
    print(f"{len(jobs)} job(s) on {where}, {how}; results in {output}")
    rows = run_jobs(jobs, config, min(workers, len(jobs)), gpus, isolate=not args.in_process)
    print("\n" + write_tables(rows, output))
    print(f"tables written to {output / 'benchmark.md'} and {output / 'benchmark.csv'}")
    random_rows = any(row["weights"] == RANDOM_WEIGHTS for row in rows)
    page = write_benchmark_report(jobs, rows, output, summary_rows(rows), random_rows)
    if page is not None:
        print(f"per-image results in {output / 'benchmark_images.csv'}, curves in {output / 'curves'}, report {page}")
    failed = sum(bool(row.get("error")) for row in rows)
    if failed:
        print(
            f"anomalib-mvfa: error: {failed} of {len(jobs)} benchmark job(s) failed; "
            f"see 'Failed jobs' in {output / 'benchmark.md'}",
            file=sys.stderr,
        )
        return 1
    return 0
