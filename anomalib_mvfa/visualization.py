"""anomalib's image visualizer, showing every format the package reads, under paths that keep the folders.

anomalib's visualizer opens each image again with PIL, which saturates 16-bit images and cannot
open DICOM or NIfTI; and it names a visualisation after the folders between the dataset's name
(or category) and the file, keeping only the last folder when neither appears in the path (in
the medical layout that folder is ``img`` for normal and abnormal images alike, so images with the
same file name overwrote each other). :class:`MvfaVisualizer` shows the image as the datamodule's
:class:`~anomalib_mvfa.data.ScanReader` reads it, roots the paths at the datamodule's ``root``
folder (``images/Brain_AD/test/Ungood/img/0001.png``), and names frames and slices apart
(``volumes/case1.nii.gz_axial080.png``, ``series/IM0001.dcm.png``).

Example:
    >>> from anomalib_mvfa.visualization import MvfaVisualizer
    >>> visualizer = MvfaVisualizer()
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from anomalib.utils.path import generate_output_filename
from anomalib.visualization import ImageVisualizer
from anomalib.visualization.image.item_visualizer import visualize_image_item

from .data.readers import DEFAULT_READER, SampleName


def _dataset_folder_names(trainer: Any) -> tuple[str | None, str | None]:
    """The dataset name and category that anomalib's output paths start after: the root folder's name."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None, None
    root = getattr(datamodule, "root", None)
    if root:
        return Path(root).resolve().name, None
    return getattr(datamodule, "name", None), getattr(datamodule, "category", None)


class MvfaVisualizer(ImageVisualizer):
    """anomalib's :class:`ImageVisualizer` for every format the package reads (see the module docstring)."""

    def on_test_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Visualise each image of a test (or prediction) batch and save it."""
        del pl_module, outputs, batch_idx, dataloader_idx
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        reader = getattr(getattr(trainer, "datamodule", None), "reader", None) or DEFAULT_READER
        for item in batch:
            name = str(item.image_path or "")
            shown = dataclasses.replace(item, image=reader.read_image(name), image_path=None) if name else item
            image = visualize_image_item(
                shown,
                fields=self.fields,
                overlay_fields=self.overlay_fields,
                field_size=self.field_size,
                fields_config=self.fields_config,
                overlay_fields_config=self.overlay_fields_config,
                text_config=self.text_config,
            )
            if image is None:
                continue
            image.save(self.image_file(trainer, name))

    def image_file(self, trainer: Any, name: str) -> Path:
        """Where the visualisation of the image ``name`` is saved (its folder is made)."""
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "images"
        dataset_name, category = _dataset_folder_names(trainer)
        sample = SampleName.parse(name)
        return generate_output_filename(
            input_path=sample.file.with_name(sample.display_name),
            output_path=self.output_dir,
            dataset_name=dataset_name,
            category=category,
        )
