"""Command line of anomalib-mvfa: ``anomalib-mvfa <command>`` (or ``python -m anomalib_mvfa``).

Training, testing, prediction and export go through anomalib's own CLI
(``anomalib train --model anomalib_mvfa.Mvfa ...``); this entry point holds what anomalib
has no command for. Each command lives in a module of this package that is imported only
when that command runs; the arguments of all of them live in the light :mod:`.options`, so
``anomalib-mvfa --help`` and ``anomalib-mvfa <command> --help`` load neither torch nor anomalib.

Example:
    anomalib-mvfa configs --dest .
    anomalib-mvfa demo --backbone tiny-random --epochs 1
    anomalib-mvfa evaluate --root datasets/MVFA --categories Brain --k-shot 4 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
import traceback
import warnings

__all__ = ["COMMANDS", "build_parser", "console", "main"]

# name -> (module of this package with run(args), one-line help); the arguments live in .options
COMMANDS = {
    "demo": ("demo", "train and test few-shot MVFA on a generated histology dataset"),
    "evaluate": ("evaluate", "AC/AS on the medical benchmark layout under both fusions, over K-shot seeds"),
    "speed": ("speed", "training and inference speed against the authors' way"),
    "benchmark": ("benchmark", "Mvfa beside any anomalib model, over data and seeds"),
    "scaling": ("scaling", "training and test speed in one process against several (DDP)"),
    "loading": ("loading", "decoding speed of DICOM, NIfTI and 16-bit PNG, and whether loading keeps up"),
    "configs": ("configs", "list the shipped anomalib configs, or copy them into a folder"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``anomalib-mvfa`` parser, every option's help with its default.

    The arguments come from the light :mod:`.options`; a command's module (torch, anomalib) is
    imported only when the command runs, so that ``anomalib-mvfa <command> --help`` answers at once.
    ``command`` is accepted for compatibility; every command gets its arguments.

    Example:
        >>> build_parser().parse_args(["configs"]).command
        'configs'
    """
    del command
    from .options import COMMAND_ARGUMENTS  # noqa: PLC0415  (light: no torch, no anomalib)

    parser = argparse.ArgumentParser(prog="anomalib-mvfa", description="MVFA for anomalib.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        COMMAND_ARGUMENTS[name](subparser)
        subparser.set_defaults(run=functools.partial(_run_command, module_name))
    return parser


def _run_command(module_name: str, args: argparse.Namespace) -> int:
    """Import the command's module (torch, anomalib) and run it."""
    return importlib.import_module(f"{__name__}.{module_name}").run(args)


def main(argv: list[str] | None = None) -> int:
    """Run a command; return its exit code (errors propagate, for use from Python).

    The caller's warning filters are the same afterwards.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((argument for argument in argv if not argument.startswith("-")), None)
    with warnings.catch_warnings():
        # anomalib and timm warn of their own deprecations when imported: not this command's business
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(anomalib|timm)(\.|$)")
        args = build_parser(command).parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return args.run(args)


def _quiet_progress_when_redirected() -> None:
    """Off a terminal, tqdm's bars stay off too (anomalib's coreset sampler draws one): no control characters in logs.

    tqdm reads ``TQDM_DISABLE`` when it is imported, which the commands do later; job processes inherit it.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")


def console(argv: list[str] | None = None) -> int:
    """The ``anomalib-mvfa`` command: :func:`main`, with bad input reported in one line instead of a traceback.

    Bad input is an :class:`~anomalib_mvfa.errors.MvfaInputError` (exit code 2). A reader of the output
    that went away (a closed pipe) ends the command quietly (exit code 1). Any other exception is a
    bug: its traceback is printed with a request to report it (exit code 1).

    Example:
        >>> console(["benchmark", "--config", "missing.yaml"])  # doctest: +SKIP
        anomalib-mvfa: error: Benchmark config 'missing.yaml' does not exist.
        2
    """
    from ..errors import MvfaInputError  # noqa: PLC0415  (light: no torch, no anomalib)

    _quiet_progress_when_redirected()  # before the command's module imports tqdm; the command line only
    try:
        return main(argv)
    except MvfaInputError as error:
        print(f"anomalib-mvfa: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output went away (``anomalib-mvfa configs | head -1``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 1
    except Exception:
        traceback.print_exc()
        print(
            "anomalib-mvfa: internal error: this is a bug in anomalib-mvfa, not a problem with your input. "
            "Please report it with the traceback above and the command you ran.",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(console())
