"""The anomalib configs shipped with the package: ``anomalib-mvfa configs``.

Without options the command lists them; ``--dest DIR`` copies them to ``DIR/configs/`` (the
layout of the repository), so that the README's commands, such as ``anomalib train --config
configs/mvfa_mvtec_few_shot.yaml``, run from ``DIR`` after a plain ``pip install``. Existing
files are left alone unless ``--force`` is given.

Example:
    anomalib-mvfa configs
    anomalib-mvfa configs --dest .
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MvfaFileNotFoundError, MvfaInputError
from .options import configs as add_arguments

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+; importlib.abc's Traversable on 3.10
    from importlib.resources.abc import Traversable

__all__ = ["add_arguments", "run", "shipped_configs"]

CONFIG_PACKAGE = "anomalib_mvfa.configs"
CONFIG_SUFFIXES = (".yaml", ".yml")


def shipped_configs() -> dict[str, Traversable]:
    """The shipped config files by their path below ``configs/`` (for example ``benchmark/x.yaml``).

    Example:
        >>> "mvfa_mvtec_few_shot.yaml" in shipped_configs()
        True
    """
    found: dict[str, Traversable] = {}

    def visit(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                visit(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(CONFIG_SUFFIXES):
                found[f"{prefix}{entry.name}"] = entry

    visit(_config_folder(), "")
    return dict(sorted(found.items()))


def _config_folder() -> Traversable:
    """The installed ``anomalib_mvfa.configs``; in a source tree imported without its install, ``configs/``."""
    try:
        return resources.files(CONFIG_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "configs"


def run(args: argparse.Namespace) -> int:
    """List the shipped configs, or copy them; return an exit code."""
    configs = shipped_configs()
    if not configs:
        msg = f"No config files were found in the installed package ({CONFIG_PACKAGE}); reinstall anomalib-mvfa."
        raise MvfaFileNotFoundError(msg)
    if args.dest is None:
        for name in configs:
            print(f"configs/{name}")
        print("Copy them with: anomalib-mvfa configs --dest .")
        return 0
    target = Path(args.dest) / "configs"
    existing = [name for name in configs if (target / name).exists()]
    if existing and not args.force:
        names = ", ".join(existing)
        msg = f"{len(existing)} config(s) already exist in '{target}' ({names}); pass --force to overwrite them."
        raise MvfaInputError(msg)
    for name, source in configs.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(source.read_bytes())
        print(f"{path}")
    return 0
