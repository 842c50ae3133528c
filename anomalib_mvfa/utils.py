"""Small helpers shared by the package."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``: it appears whole or not at all.

    Example:
        >>> import torch
        >>> write_atomically("out/adapters.pth", lambda name: torch.save({}, name))  # doctest: +SKIP
        PosixPath('out/adapters.pth')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        Path(temporary).replace(path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path
