"""Gathers what the runs of one command leave, and writes the curves and the report page.

``anomalib-mvfa evaluate`` adds a series per fusion (``ours``, ``authors``); ``anomalib-mvfa
benchmark`` a series per model. Series of one category are overlaid on one plot, seeds make a
mean ± std band.

Example:
    >>> report = RunReport()
    >>> report.add_images("Brain", 0, "ours", scores, labels)  # doctest: +SKIP
    >>> report.add_pixels("Brain", 0, {"ours": maps}, masks)  # doctest: +SKIP
    >>> report.write(Path("results/evaluation"), "report.html", "MVFA 4-shot", tables)  # doctest: +SKIP
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.functional import interpolate

from ..data.readers import SampleName
from .curves import CurvePlot, CurveSeries, write_curves
from .page import THUMBNAIL_PIXELS, GalleryTile, ReportSection, SliceThumbnail, TileMap, write_report
from .results import pixel_sample

if TYPE_CHECKING:
    from ..data.readers import ScanReader

Level = str  # "image" or "pixel"
# the most characters of why an image cannot be shown (the cell names the image already)
REASON_CHARACTERS = 160


class RunReport:
    """Scores, pixel samples, gallery tiles and summary rows of every run, by category."""

    def __init__(self) -> None:
        # (category, level) -> series name -> (seeds, scores, targets)
        self.curves: dict[tuple[str, Level], dict[str, tuple[list[int], list, list]]] = defaultdict(dict)
        self.tiles: dict[str, list[GalleryTile]] = defaultdict(list)
        self.summaries: dict[str, list[dict[str, object]]] = defaultdict(list)

    def add_series(
        self, category: str, level: Level, seed: int, name: str, scores: torch.Tensor, targets: torch.Tensor
    ) -> None:
        """Scores (1-D) and their 0/1 targets of series ``name`` in one run, at ``level`` (image or pixel)."""
        seeds, all_scores, all_targets = self.curves[category, level].setdefault(name, ([], [], []))
        seeds.append(seed)
        all_scores.append(scores.detach().flatten().float().cpu())
        all_targets.append(targets.detach().flatten().long().cpu())

    def add_images(self, category: str, seed: int, name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Image scores of series ``name`` for one run (``N`` each)."""
        self.add_series(category, "image", seed, name, scores, labels)

    def add_pixels(self, category: str, seed: int, maps: dict[str, torch.Tensor], masks: torch.Tensor) -> None:
        """Anomaly maps of one or more series for one run, against ``masks`` (``N x H x W`` each).

        The same seeded sample of pixels is kept of every series (see :func:`.results.pixel_sample`).
        """
        names = list(maps)
        sampled, targets = pixel_sample([maps[name] for name in names], masks, seed=seed)
        for name, values in zip(names, sampled, strict=True):
            self.add_series(category, "pixel", seed, name, values, targets)

    def add_tile(self, category: str, tile: GalleryTile) -> None:
        """A gallery image of ``category``."""
        self.tiles[category].append(tile)

    def add_summary(self, category: str, row: dict[str, object]) -> None:
        """A row of the category's own table (pixel AUROC, AUPRO, Dice of one run)."""
        self.summaries[category].append(row)

    def plots(self) -> list[CurvePlot]:
        """One plot per category and level, in the order the runs came."""
        return [
            CurvePlot(category, level, [CurveSeries(name, *values) for name, values in series.items()])
            for (category, level), series in self.curves.items()
        ]

    def write(
        self,
        folder: Path,
        page_name: str,
        title: str,
        tables: dict[str, list[dict[str, object]]],
        notes: list[str],
        warning: str | None = None,
    ) -> Path:
        """Write ``<folder>/curves/`` (PNG and ``curves.csv``) and the page ``<folder>/<page_name>``.

        ``warning`` is shown at the top of the page (e.g. random weights: the accuracy means nothing).
        """
        plots = self.plots()
        images = write_curves(plots, folder / "curves")
        by_category: dict[str, list[Path]] = defaultdict(list)
        for plot, pair in zip(plots, zip(images[::2], images[1::2], strict=True), strict=True):
            by_category[plot.category].extend(pair)
        categories = list(dict.fromkeys([*by_category, *self.tiles]))
        sections = [
            ReportSection(
                category,
                by_category.get(category, []),
                self.tiles.get(category, []),
                self.summaries.get(category) or None,
            )
            for category in categories
        ]
        return write_report(folder / page_name, title, tables, sections, notes, warning)


def tile_image(image: torch.Tensor) -> np.ndarray:
    """A ``3 x H x W`` (or ``H x W``) image tensor as the ``H x W x 3`` array in [0, 1] a tile shows."""
    image = image.detach().float().cpu()
    if image.ndim == 2:
        image = image.expand(3, *image.shape)
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def make_tile(
    kind: str,
    file: str,
    label: int,
    image: torch.Tensor,
    mask: torch.Tensor | None,
    maps: list[TileMap],
    model: str | None = None,
) -> GalleryTile:
    """A gallery tile from tensors (the image as the model saw it, its mask, each series' view).

    ``model`` is the model (or fusion) whose decision ``kind`` is, named in the gallery's heading.
    """
    mask_array = None if mask is None else mask.detach().cpu().bool().reshape(image.shape[-2:]).numpy()
    return GalleryTile(
        kind=kind, file=file, label=int(label), image=tile_image(image), mask=mask_array, maps=maps, model=model
    )


def slice_thumbnail(
    sample: str, reader: ScanReader, view: TileMap | None = None, name: str | None = None, size: int = THUMBNAIL_PIXELS
) -> SliceThumbnail:
    """A table cell's picture of ``sample``, read with ``reader`` (the run's), ``size`` pixels square.

    The image is resized as the model saw it (square, bicubic) and ``view``'s map with it (bilinear,
    antialiased); the cell is captioned ``name`` (``sample`` without one). A sample that cannot be read
    gives a cell with the name and why, not an error: the page is written all the same.

    Example:
        >>> from anomalib_mvfa.data import ScanReader
        >>> cell = slice_thumbnail("absent.nii.gz#axial=003", ScanReader())
        >>> cell.image is None, cell.reason is not None
        (True, True)
    """
    shown = sample if name is None else name
    try:
        image = reader.read_image(sample)
    except (ValueError, OSError) as error:  # the reader's MvfaInputError, or the file went away since the run
        file = SampleName.parse(sample).file
        reason = str(error) or type(error).__name__
        reason = reason.replace(str(file), file.name)  # the cell names the slice: its long path says no more
        if len(reason) > REASON_CHARACTERS:
            reason = reason[: REASON_CHARACTERS - 1] + "…"
        return SliceThumbnail(shown, None, reason=reason)
    image = interpolate(image[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    pixels = (tile_image(image[0]) * 255).round().astype(np.uint8)
    if view is not None:
        values = torch.as_tensor(np.asarray(view.anomaly_map, dtype=np.float32))[None, None]
        values = interpolate(values, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        view = replace(view, anomaly_map=values[0, 0].numpy())
    return SliceThumbnail(shown, pixels, view)
