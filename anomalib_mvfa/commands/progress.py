"""Progress bars of the long commands: one for the whole command, one for the current job.

Bars are drawn on a terminal only: with the output redirected to a file or a pipe (a CI log, a
cluster's job log) they are off, and no control characters reach the file. Lines printed while a
bar is shown go through :func:`say`, which keeps the bars whole.

Example:
    >>> with overall_bar(6, "evaluate") as bar:  # doctest: +SKIP
    ...     for run in runs:
    ...         ...
    ...         bar.update()
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

Item = TypeVar("Item")


def on_terminal() -> bool:
    """Whether progress is shown: standard error is a terminal (not a file, pipe or CI log)."""
    return sys.stderr.isatty()


def overall_bar(total: int, description: str) -> tqdm:
    """The command's bar: jobs done of ``total``, elapsed time and time left."""
    return tqdm(
        total=total,
        desc=description,
        unit="job",
        position=0,
        dynamic_ncols=True,
        disable=not on_terminal(),
        bar_format="{desc}: {n_fmt}/{total_fmt} jobs |{bar}| elapsed {elapsed}, left {remaining}",
    )


def job_bar(items: Iterable[Item], total: int, description: str) -> Iterator[Item]:
    """Iterate ``items`` under the current job's bar (below the command's; gone when done)."""
    yield from tqdm(
        items,
        total=total,
        desc=description,
        position=1,
        leave=False,
        dynamic_ncols=True,
        disable=not on_terminal(),
    )


def say(*parts: object) -> None:
    """Print a line without breaking the bars (plain ``print`` when none is shown)."""
    line = " ".join(str(part) for part in parts)
    if on_terminal():
        tqdm.write(line)
    else:
        print(line, flush=True)
