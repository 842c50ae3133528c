"""anomalib's image visualizer with output paths that keep every folder below the dataset root.

anomalib names a visualisation after the folders between the dataset's name (or category) and
the file; when neither appears in the path it keeps only the last folder. In the medical layout
that folder is ``img`` for normal and abnormal images alike, so a normal and an abnormal image with
the same file name overwrote each other. :class:`MvfaVisualizer` roots the paths at the
datamodule's ``root`` folder, which keeps the split and label folders
(``images/Brain_AD/test/Ungood/img/0001.png``).

Example:
    >>> from anomalib_mvfa.visualization import MvfaVisualizer
    >>> visualizer = MvfaVisualizer()
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from anomalib.visualization import ImageVisualizer


def _rooted_trainer(trainer: Any) -> SimpleNamespace:
    """What anomalib's visualizer reads of the trainer, with the dataset named by its root folder."""
    datamodule = getattr(trainer, "datamodule", None)
    root = getattr(datamodule, "root", None)
    name = Path(root).resolve().name if root else getattr(datamodule, "name", None)
    category = None if root else getattr(datamodule, "category", None)
    named = SimpleNamespace(name=name, category=category) if datamodule is not None else None
    return SimpleNamespace(default_root_dir=trainer.default_root_dir, datamodule=named)


class MvfaVisualizer(ImageVisualizer):
    """anomalib's :class:`ImageVisualizer`, writing each image under its folders below the dataset root."""

    def on_test_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        """Visualise a test batch; see anomalib's ``ImageVisualizer``."""
        super().on_test_batch_end(_rooted_trainer(trainer), *args, **kwargs)
