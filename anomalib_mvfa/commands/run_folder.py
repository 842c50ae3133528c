"""The results folder of one ``evaluate`` or ``benchmark`` run: ``OUTPUT/v0``, ``v1``, ... and ``OUTPUT/latest``.

Every run writes into a new version folder of its own under ``--output`` (as anomalib's results
folders do), and the ``latest`` link points at the newest, so that no run replaces another's tables,
curves or maps: a few-shot and a zero-shot evaluation into the same ``--output`` stay side by side.

Under DDP all processes of one run share the first process's folder: Lightning's ``ddp`` launcher
starts its processes with this process's environment (:data:`RUN_FOLDER_VARIABLE`), and processes
started together by torchrun or SLURM read it from the note the first one leaves in ``OUTPUT``.
Light: neither torch nor anomalib is imported here.

Example:
    >>> with shared_run_folder("results/evaluation") as folder:  # doctest: +SKIP
    ...     (folder / "table.md").write_text("...")
    >>> folder.name, (folder.parent / "latest").resolve() == folder.resolve()  # doctest: +SKIP
    ('v0', True)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MvfaInputError

__all__ = ["RUN_FOLDER_VARIABLE", "new_run_folder", "shared_run_folder"]

logger = logging.getLogger(__name__)

# the run folder chosen by the first process, for the processes it launches
RUN_FOLDER_VARIABLE = "ANOMALIB_MVFA_RUN_FOLDER"
NOTE = ".run-folder.json"  # the first process's choice, for processes a launcher started beside it
LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID")
VERSION = re.compile(r"v(\d+)")


def new_run_folder(output: str | Path) -> Path:
    """Create the next version folder ``output/v<N>`` and point ``output/latest`` at it; return it.

    Two runs started at once get different folders (the folder is created, never reused).

    Raises:
        MvfaInputError: If ``output`` exists and is not a folder.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        msg = f"--output '{output}' is a file; it must be a folder (each run writes into a new version in it)."
        raise MvfaInputError(msg)
    output.mkdir(parents=True, exist_ok=True)
    taken = [int(match[1]) for path in output.iterdir() if (match := VERSION.fullmatch(path.name))]
    version = max(taken, default=-1) + 1
    while True:
        folder = output / f"v{version}"
        try:
            folder.mkdir()
            break
        except FileExistsError:  # another run took it meanwhile
            version += 1
    _point_latest(folder)
    return folder


def _point_latest(folder: Path) -> None:
    """Point ``latest`` beside ``folder`` at it (a relative link, replaced in one step)."""
    link = folder.parent / "latest"
    temporary = folder.parent / f".latest-{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        os.symlink(folder.name, temporary, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as error:  # no symbolic links here, or 'latest' is a folder of the user's
        temporary.unlink(missing_ok=True)
        logger.info("No 'latest' link to %s (%s).", folder, error)


def _launch_key() -> str:
    return "|".join(os.environ.get(name, "") for name in LAUNCH_VARIABLES)


def _launched_rank() -> int:
    """This process's rank as a launcher (torchrun, SLURM) set it in the environment; 0 outside one."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def _launched_world() -> int:
    value = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    return int(value) if value.isdigit() else 1


@contextmanager
def shared_run_folder(output: str | Path, wait_s: float = 600.0) -> Iterator[Path]:
    """The run folder of this process, for the ``with`` block: a new one (:func:`new_run_folder`), or the first's.

    - :data:`RUN_FOLDER_VARIABLE` set (by the process that launched this one): that folder;
    - a process of rank above 0 started by torchrun or SLURM: the folder the rank-0 process noted
      in ``output``, waited for up to ``wait_s`` seconds;
    - otherwise a new folder, set in :data:`RUN_FOLDER_VARIABLE` for the processes this one starts
      (Lightning's ``ddp``) during the block, and noted in ``output`` for those a launcher started beside it.

    Raises:
        MvfaInputError: If the first process's note does not appear in time.
    """
    given = os.environ.get(RUN_FOLDER_VARIABLE)
    if given:
        yield Path(given)
        return
    output = Path(output)
    note = output / NOTE
    if _launched_rank() > 0:
        started = time.time()
        while time.time() - started < wait_s:
            try:
                content = json.loads(note.read_text())
                fresh = note.stat().st_mtime >= started - 60  # not a note of an earlier launch
            except (OSError, ValueError):
                content, fresh = {}, False
            if fresh and content.get("launch") == _launch_key():
                yield output / content["folder"]
                return
            time.sleep(0.2)
        msg = f"The first process of this launch noted no run folder in '{output}' within {wait_s:.0f} s."
        raise MvfaInputError(msg)
    folder = new_run_folder(output)
    if _launched_world() > 1:
        temporary = output / f"{NOTE}.{os.getpid()}"
        temporary.write_text(json.dumps({"folder": folder.name, "launch": _launch_key()}))
        os.replace(temporary, note)
    os.environ[RUN_FOLDER_VARIABLE] = str(folder)
    try:
        yield folder
    finally:
        del os.environ[RUN_FOLDER_VARIABLE]
