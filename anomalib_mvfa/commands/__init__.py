"""Command line of anomalib-mvfa: ``anomalib-mvfa <command>`` (or ``python -m anomalib_mvfa``).

Training, testing, prediction and export go through anomalib's own CLI
(``anomalib train --model anomalib_mvfa.Mvfa ...``); this entry point holds what anomalib
has no command for.

Example:
    anomalib-mvfa demo --backbone tiny-random --epochs 1
    anomalib-mvfa evaluate --root datasets/MVFA --categories Brain --k-shot 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import benchmark, demo, evaluation, speed
from .backbone import PretrainedWeightsError


def build_parser() -> argparse.ArgumentParser:
    """The ``anomalib-mvfa`` parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="anomalib-mvfa", description="MVFA for anomalib.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train and test few-shot MVFA on a generated histology dataset")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    evaluate_parser = commands.add_parser(
        "evaluate", help="AC/AS on the medical benchmark layout under both fusions, over K-shot seeds"
    )
    evaluation.add_arguments(evaluate_parser)
    evaluate_parser.set_defaults(run=evaluation.run)
    speed_parser = commands.add_parser("speed", help="training and inference speed against the authors' way")
    speed.add_arguments(speed_parser)
    speed_parser.set_defaults(run=speed.run)
    benchmark_parser = commands.add_parser("benchmark", help="Mvfa beside any anomalib model, over data and seeds")
    benchmark.add_arguments(benchmark_parser)
    benchmark_parser.set_defaults(run=benchmark.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; return its exit code (errors propagate, for use from Python)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.run(args)


def console(argv: list[str] | None = None) -> int:
    """The ``anomalib-mvfa`` command: :func:`main`, with bad input reported in one line instead of a traceback.

    Example:
        >>> console(["benchmark", "--config", "missing.yaml"])  # doctest: +SKIP
        anomalib-mvfa: error: Benchmark config 'missing.yaml' does not exist.
        2
    """
    try:
        return main(argv)
    except (ValueError, PretrainedWeightsError, FileNotFoundError, FloatingPointError) as error:
        print(f"anomalib-mvfa: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console())
