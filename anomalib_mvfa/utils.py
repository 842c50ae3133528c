"""Small helpers shared by the package."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


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
        with Path(temporary).open("rb+") as file:  # on disk before the rename: a power loss leaves no empty file
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # a plain write's permissions (mkstemp makes 0600)
        Path(temporary).replace(path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(CheckpointIO):
    """A checkpoint writer (Lightning's or anomalib's) whose checkpoints appear whole or not at all.

    Local checkpoints are written by ``wrapped`` to a temporary file beside the target, synced and
    renamed (a full disk or a kill leaves no truncated ``model.ckpt``); other paths (``s3://`` and
    the like) and loading go to ``wrapped`` as they are.

    Example:
        >>> trainer.strategy.checkpoint_io = AtomicCheckpointIO(trainer.strategy.checkpoint_io)  # doctest: +SKIP
    """

    def __init__(self, wrapped: CheckpointIO | None = None) -> None:
        self.wrapped = wrapped if wrapped is not None else TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        save = self.wrapped.save_checkpoint
        if "://" in str(path):
            save(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda temporary: save(checkpoint, temporary, storage_options))

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Load with the wrapped writer."""
        return self.wrapped.load_checkpoint(*args, **kwargs)

    def remove_checkpoint(self, path: str | Path) -> None:
        """Remove with the wrapped writer."""
        self.wrapped.remove_checkpoint(path)

    def teardown(self) -> None:
        """Tear the wrapped writer down."""
        self.wrapped.teardown()


def export_atomically(export_root: str | Path, export: Callable[[Path], Path]) -> Path:
    """Run ``export(staging_root)`` in a hidden staging folder, then move its files into ``export_root``.

    ``export`` writes an exported model under the root it is given and returns the path of the
    file that loads it. Every file is moved with an atomic rename, that file last, so an
    interrupted export never leaves a loadable half-written model.

    Example:
        >>> export_atomically("results", lambda root: model.to_torch(root))  # doctest: +SKIP
        PosixPath('results/weights/torch/model.pt')
    """
    root = Path(export_root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=root) as staging:
        staged = Path(export(Path(staging)))
        target = root / staged.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        for file in sorted(staged.parent.iterdir(), key=lambda file: file == staged):
            if file.is_file():
                Path(file).replace(target.parent / file.name)
    return target
