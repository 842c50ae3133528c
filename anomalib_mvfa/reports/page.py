"""One self-contained HTML page of an evaluation or benchmark run, for people to read.

The page holds a title, notes, the results tables and, per category, the curve images and a
gallery of the worst false positives, the worst false negatives and a few true positives. Every
image is embedded as a ``data:image/png`` URI and the style sheet is inline, so the page opens
from disk, offline, with no other file and no script.

A gallery tile is one test image: the image, its ground-truth mask, then one panel per model (or
fusion) with that model's anomaly map over the image, so a benchmark shows the models side by
side on the same image. A table cell may show an image too (:class:`SliceThumbnail`, e.g. a study's
highest-scoring slice): one small panel drawn as a tile's map panel, embedded the same way.

Example:
    >>> section = ReportSection("Brain", curves=[Path("curves/Brain_roc.png")], tiles=[tile])  # doctest: +SKIP
    >>> write_report(Path("results/report.html"), "MVFA on Brain", {"Image AUROC": rows}, [section])  # doctest: +SKIP
    PosixPath('results/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from .. import __version__
from ..errors import MvfaInputError
from .cells import NOT_APPLICABLE, column_label, format_cell, format_number, is_number

# gallery groups, in the order the page shows them; other kinds follow in order of appearance
KINDS = ("false positive", "false negative", "true positive")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# inches per panel of a gallery tile, and its resolution
PANEL_SIZE = 2.4
TILE_DPI = 100
# pixels of the side of a table cell's slice picture (SliceThumbnail)
THUMBNAIL_PIXELS = 128
# the scale of a map that says nothing of its scale: its colours are shared by the maps of its name only
DEFAULT_SCALE = "score"
# the colour of the pixel threshold's contour on a map and its mark on the colour bar (jet over grey never gives it)
CONTOUR_COLOUR = "#ff00ff"

# what a map's scale (TileMap.scale) means, one line each, shown once on the page above the tables
SCALE_NOTES = {
    "z-score": "the mean of the two branches' z-scores against the normal support images: 0 is a typical normal "
    "image, 1 is one standard deviation above it",
    "zero-shot score": "the zero-shot branch's score (no support images to calibrate against)",
    "test min-max": "each branch min-max scaled over the test set, then averaged: in [0, 1], relative to this test "
    "set only; it has no threshold",
    "normalised": "anomalib's normalised score: min-max scaled with the validation split's range, the threshold "
    "moved to 0.5",
}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125;
       max-width: 1320px; margin: 0 auto; padding: 1rem 1.5rem 3rem; line-height: 1.45; }
header { border-bottom: 1px solid #d0d4d9; margin-bottom: 1rem; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #d0d4d9; padding-bottom: 0.2rem; margin-top: 2.5rem; }
.generated { color: #5f6871; font-size: 0.85rem; margin-top: 0; }
nav ul { display: flex; flex-wrap: wrap; gap: 0.3rem 1rem; list-style: none; padding: 0; }
.notes p { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 0.8rem; white-space: pre-line; }
.warning { background: #fdecea; border: 2px solid #c62828; color: #8e1b1b; font-weight: 600; padding: 0.6rem 0.9rem; }
.scales { font-size: 0.9rem; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d4d9; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f1f3f5; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1rem; }
.gallery { display: grid; grid-template-columns: 1fr; gap: 1.2rem; }
figure { margin: 0; }
figcaption { font-size: 0.85rem; color: #3b434b; margin-top: 0.2rem; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; display: block; border: 1px solid #e3e6e9; }
td.slice { min-width: 128px; max-width: 180px; }
.empty { color: #5f6871; font-style: italic; }
"""


@dataclass
class TileMap:
    """One model's (or fusion's) view of a gallery image.

    Attributes:
        name: the model or fusion, e.g. ``"ours"`` or ``"Patchcore"``.
        anomaly_map: ``H x W`` float map, in the score's scale (one colour scale per category and name).
        score: the image score.
        threshold: the image threshold of that score, ``None`` when the run has none.
        decision: 1 anomalous, 0 normal, ``None`` when the run made none.
        scale: what the score and the map are, e.g. ``"z-score"`` (explained on the page, see :data:`SCALE_NOTES`).
        pixel_threshold: the map's threshold, drawn as a contour; ``None`` when the run has none.

    Example:
        >>> TileMap("ours", np.zeros((32, 32)), score=1.83, threshold=1.2, decision=1, scale="z-score").name
        'ours'
    """

    name: str
    anomaly_map: np.ndarray
    score: float
    threshold: float | None
    decision: int | None
    scale: str = DEFAULT_SCALE
    pixel_threshold: float | None = None


@dataclass
class GalleryTile:
    """One test image of the gallery.

    Attributes:
        kind: ``"false positive"``, ``"false negative"`` or ``"true positive"``.
        file: the sample name shown under the tile.
        label: ground truth, 1 anomalous or 0 normal.
        image: ``H x W x 3`` float image in [0, 1], as the model saw it.
        mask: ``H x W`` bool ground-truth mask, ``None`` without one.
        maps: one :class:`TileMap` per model or fusion, shown side by side.
        model: whose decision ``kind`` is (the gallery's heading names it), ``None`` for none in particular.

    Example:
        >>> tile = GalleryTile("false positive", "scan_012.png", 0, np.zeros((32, 32, 3)), None, [])
        >>> tile.kind
        'false positive'
    """

    kind: str
    file: str
    label: int
    image: np.ndarray
    mask: np.ndarray | None
    maps: list[TileMap]
    model: str | None = None


@dataclass
class SliceThumbnail:
    """A table cell that shows one image (a study's highest slice): the image with a model's map over it.

    Drawn as a gallery tile's map panel (same colours, same pixel-threshold contour), without title or
    colour bar; the maps of one table share one colour scale per :func:`colour_key`.

    Attributes:
        name: what the cell says the image is (caption and alt text), e.g. ``"IM0031.dcm"``.
        image: ``H x W x 3`` image, floats in [0, 1] or ``uint8``; ``None`` when it could not be read.
        view: the model's map of the image (``H x W``), ``None`` for the image alone.
        reason: why there is no image, shown beside the name.

    Example:
        >>> SliceThumbnail("vol.nii.gz#axial=003", None, reason="the file does not exist").image is None
        True
    """

    name: str
    image: np.ndarray | None
    view: TileMap | None = None
    reason: str | None = None


@dataclass
class ReportSection:
    """One category: its curve PNG files and its gallery.

    Attributes:
        category: the category's name (the section's heading).
        curves: PNG files (ROC, precision-recall); embedded in the page, not linked.
        tiles: the gallery's tiles, in the order to show them within each kind.
        summary: optional per-category rows (e.g. pixel AUROC, AUPRO, Dice), shown as a table.

    Example:
        >>> ReportSection("Brain", curves=[], tiles=[]).summary is None
        True
    """

    category: str
    curves: list[Path]
    tiles: list[GalleryTile]
    summary: list[dict[str, object]] | None = None


def colour_key(tile_map: TileMap) -> tuple[str, str]:
    """Which maps share a colour scale: all maps of one named scale (``"normalised"``), else those of one name.

    Example:
        >>> colour_key(TileMap("Patchcore", np.zeros((1, 1)), 0.7, 0.5, 1, scale="normalised"))
        ('normalised', '')
        >>> colour_key(TileMap("ours", np.zeros((1, 1)), 0.7, None, None))
        ('score', 'ours')
    """
    return (tile_map.scale, "") if tile_map.scale != DEFAULT_SCALE else (tile_map.scale, tile_map.name)


def colour_limits(tiles: list[GalleryTile]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per :func:`colour_key`, the lowest and highest finite value of those maps over ``tiles``: one colour scale.

    Every tile of a category is drawn with these limits, so the same value has the same colour in
    every tile of the category (maps of other scales keep their own).

    Example:
        >>> maps = [TileMap("ours", np.array([[0.0, 2.0]]), 1.0, None, None, scale="z-score")]
        >>> colour_limits([GalleryTile("true positive", "a.png", 1, np.zeros((1, 2, 3)), None, maps)])
        {('z-score', ''): (0.0, 2.0)}
    """
    return map_limits([tile_map for tile in tiles for tile_map in tile.maps])


def map_limits(maps: list[TileMap]) -> dict[tuple[str, str], tuple[float, float]]:
    """Per :func:`colour_key`, the lowest and highest finite value of ``maps``.

    Example:
        >>> map_limits([TileMap("ours", np.array([[1.0, np.nan, 3.0]]), 2.0, None, None)])
        {('score', 'ours'): (1.0, 3.0)}
    """
    limits: dict[tuple[str, str], tuple[float, float]] = {}
    for tile_map in maps:
        values = np.asarray(tile_map.anomaly_map, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            continue
        low, high = limits.get(colour_key(tile_map), (math.inf, -math.inf))
        limits[colour_key(tile_map)] = (min(low, float(finite.min())), max(high, float(finite.max())))
    return limits


def render_tile(tile: GalleryTile, limits: dict[tuple[str, str], tuple[float, float]] | None = None) -> bytes:
    """PNG bytes of one gallery tile: the image, the ground-truth mask, then one panel per map.

    Each map panel shows the image with the anomaly map overlaid in the colours of ``limits`` (per
    :func:`colour_key`, see :func:`colour_limits`; this tile's own range without them), the pixel threshold's
    contour, and a title with the map's name, the score against the threshold and the decision.
    Drawn with :class:`matplotlib.figure.Figure` (no pyplot, no global state).

    Raises:
        ValueError: the image is not ``H x W x 3``, or a mask or map is not the image's ``H x W``.

    Example:
        >>> tile = GalleryTile("true positive", "a.png", 1, np.random.rand(32, 32, 3), None,
        ...                    [TileMap("ours", np.random.rand(32, 32), 1.83, 1.2, 1, "z-score", 0.5)])
        >>> render_tile(tile)[1:4]
        b'PNG'
    """
    _check_tile(tile)
    limits = {**colour_limits([tile]), **(limits or {})}
    image = _display_image(tile.image)
    panels = 2 + len(tile.maps)
    figure = Figure(figsize=(PANEL_SIZE * panels, PANEL_SIZE + 0.9), dpi=TILE_DPI, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])

    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)

    axes[1].set_title("ground truth", fontsize=9)
    if tile.mask is None:
        axes[1].imshow(np.full(image.shape[:2], 0.92), cmap="gray", vmin=0, vmax=1)
        axes[1].text(0.5, 0.5, "no mask", ha="center", va="center", transform=axes[1].transAxes, color="#555555")
    else:
        axes[1].imshow(np.asarray(tile.mask, dtype=bool), cmap="gray", vmin=0, vmax=1, interpolation="nearest")

    for axis, tile_map in zip(axes[2:], tile.maps, strict=True):
        low, high = _map_range(tile_map, limits)
        overlay = _draw_map(axis, image, tile_map, low, high)
        axis.set_title(_map_title(tile_map), fontsize=9)
        bar = figure.colorbar(overlay, ax=axis, fraction=0.046, pad=0.03)
        bar.ax.tick_params(labelsize=7)
        label = f"{tile_map.scale}, one colour scale per category"
        threshold = tile_map.pixel_threshold
        if threshold is not None and math.isfinite(threshold):
            if low <= threshold <= high:
                bar.ax.axhline(threshold, color=CONTOUR_COLOUR, linewidth=2)
            label += f"\npixel threshold {format_number(threshold)}"
        bar.set_label(label, fontsize=7)
    return _png_bytes(figure, bbox_inches="tight", pad_inches=0.05)


def render_thumbnail(
    thumbnail: SliceThumbnail, limits: dict[tuple[str, str], tuple[float, float]] | None = None
) -> bytes:
    """PNG bytes of a table cell's image: one ``H x W`` pixel panel, the map over the image as in a tile.

    Raises:
        MvfaInputError: there is no image, the image is not ``H x W x 3``, or the map is not its ``H x W``.

    Example:
        >>> view = TileMap("ours", np.random.rand(32, 32), 1.83, 1.2, 1, "z-score", 0.5)
        >>> render_thumbnail(SliceThumbnail("IM0031.dcm", np.random.rand(32, 32, 3), view))[1:4]
        b'PNG'
    """
    _check_thumbnail(thumbnail)
    image = _display_image(thumbnail.image)
    height, width = image.shape[:2]
    figure = Figure(figsize=(width / TILE_DPI, height / TILE_DPI), dpi=TILE_DPI)
    axis = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    axis.set_axis_off()
    if thumbnail.view is None:
        axis.imshow(image)
    else:
        limits = {**map_limits([thumbnail.view]), **(limits or {})}
        _draw_map(axis, image, thumbnail.view, *_map_range(thumbnail.view, limits))
    return _png_bytes(figure)


def _map_range(tile_map: TileMap, limits: dict[tuple[str, str], tuple[float, float]]) -> tuple[float, float]:
    """The colour range of ``tile_map`` in ``limits`` (never empty)."""
    low, high = limits.get(colour_key(tile_map), (0.0, 1.0))
    return low, high if high > low else low + 1.0


def _draw_map(axis: Axes, image: np.ndarray, tile_map: TileMap, low: float, high: float) -> AxesImage:
    """Draw ``image``, the map over it in ``low`` to ``high`` and the pixel threshold's contour; the map's artist."""
    values = np.asarray(tile_map.anomaly_map, dtype=np.float64)
    axis.imshow(image)
    overlay = axis.imshow(np.ma.masked_invalid(values), cmap="jet", alpha=0.5, vmin=low, vmax=high)
    threshold = tile_map.pixel_threshold
    if threshold is not None and math.isfinite(threshold):
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() < threshold < finite.max():
            axis.contour(
                np.nan_to_num(values, nan=low),
                levels=[threshold],
                colors=CONTOUR_COLOUR,
                linewidths=1.2,
                linestyles="solid",
            )
    return overlay


def _png_bytes(figure: Figure, **options: object) -> bytes:
    """The figure as PNG bytes at :data:`TILE_DPI`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=TILE_DPI, **options)
    return buffer.getvalue()


def write_report(
    path: Path,
    title: str,
    tables: dict[str, list[dict[str, object]]],
    sections: list[ReportSection],
    notes: list[str] | None = None,
    warning: str | None = None,
) -> Path:
    """Write the report page to ``path`` atomically: it appears whole or not at all.

    Args:
        path: the HTML file to write (its folder is made).
        title: the page's title and heading.
        tables: table heading -> rows (dicts with the same keys), shown as ``<table class="results">``;
            cells are written by :func:`.cells.format_cell` (AUROC, AUPRO, Dice, F1 in percent from fractions,
            3 significant digits, ``None`` as ``-``).
        sections: one per category: summary table, curve images and gallery (grouped by kind).
        notes: plain-text paragraphs shown under the title.
        warning: a line shown above everything, e.g. that a run used random weights so its accuracy means nothing.

    Returns:
        ``path``.

    Raises:
        ValueError: a curve file is missing or not a PNG, or a gallery tile's (or a table's
            :class:`SliceThumbnail`'s) image, mask or map has the wrong shape. Every input is checked
            before anything is written.

    Example:
        >>> write_report(Path("results/report.html"), "MVFA, 4-shot", {"AC": rows}, sections,
        ...              notes=["Random weights: the scores say nothing about the method."])  # doctest: +SKIP
        PosixPath('results/report.html')
    """
    from ..utils import write_atomically  # noqa: PLC0415 (the utils module loads anomalib and lightning)

    path = Path(path)
    for heading, rows in tables.items():
        for value in (value for row in rows for value in row.values()):
            if not isinstance(value, SliceThumbnail) or value.image is None:
                continue  # a thumbnail without an image shows its name and why
            try:
                _check_thumbnail(value)
            except ValueError as error:
                msg = f"table {heading!r}: {error}"
                raise MvfaInputError(msg) from error
    for section in sections:
        for curve in section.curves:
            _check_curve(section.category, Path(curve))
        for tile in section.tiles:
            try:
                _check_tile(tile)
            except ValueError as error:
                msg = f"category {section.category!r}: {error}"
                raise MvfaInputError(msg) from error

    page = _page(title, tables, sections, notes or [], path.parent, warning)
    write_atomically(path, lambda temporary: Path(temporary).write_text(page, encoding="utf-8"))
    return path


def _check_curve(category: str, curve: Path) -> None:
    """Raise ValueError unless ``curve`` is an existing PNG file."""
    if not curve.is_file():
        msg = f"category {category!r}: curve file does not exist: {curve}"
        raise MvfaInputError(msg)
    with curve.open("rb") as file:
        if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            msg = f"category {category!r}: curve file is not a PNG image: {curve}"
            raise MvfaInputError(msg)


def _check_tile(tile: GalleryTile) -> None:
    """Raise ValueError naming the tile and the array whose shape is wrong."""
    image = np.asarray(tile.image)
    if image.ndim != 3 or image.shape[2] != 3:
        msg = f"gallery tile {tile.file!r}: image must be H x W x 3, got shape {image.shape}"
        raise MvfaInputError(msg)
    size = image.shape[:2]
    if tile.mask is not None and np.shape(tile.mask) != size:
        msg = f"gallery tile {tile.file!r}: mask shape {np.shape(tile.mask)} differs from the image's {size}"
        raise MvfaInputError(msg)
    for tile_map in tile.maps:
        if np.shape(tile_map.anomaly_map) != size:
            msg = (
                f"gallery tile {tile.file!r}: anomaly map {tile_map.name!r} has shape "
                f"{np.shape(tile_map.anomaly_map)}, which differs from the image's {size}"
            )
            raise MvfaInputError(msg)


def _check_thumbnail(thumbnail: SliceThumbnail) -> None:
    """Raise MvfaInputError naming the thumbnail unless its image is ``H x W x 3`` and its map ``H x W``."""
    if thumbnail.image is None:
        msg = f"image {thumbnail.name!r}: there is no image to draw ({thumbnail.reason or 'no reason given'})"
        raise MvfaInputError(msg)
    shape = np.shape(thumbnail.image)
    if len(shape) != 3 or shape[2] != 3:
        msg = f"image {thumbnail.name!r}: must be H x W x 3, got shape {shape}"
        raise MvfaInputError(msg)
    if thumbnail.view is not None and np.shape(thumbnail.view.anomaly_map) != shape[:2]:
        msg = (
            f"image {thumbnail.name!r}: anomaly map {thumbnail.view.name!r} has shape "
            f"{np.shape(thumbnail.view.anomaly_map)}, which differs from the image's {shape[:2]}"
        )
        raise MvfaInputError(msg)


def _display_image(image: np.ndarray) -> np.ndarray:
    """The image as floats in [0, 1] (8-bit images are scaled; anything else is clipped)."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        image = image / 255.0
    return np.clip(np.nan_to_num(image.astype(np.float64)), 0.0, 1.0)


def _map_title(tile_map: TileMap) -> str:
    """The panel title: name, score against threshold, and the decision when there is one."""
    lines = [tile_map.name, _score_text(tile_map.score, tile_map.threshold, tile_map.scale)]
    if tile_map.decision is not None:
        lines.append("predicted anomalous" if tile_map.decision else "predicted normal")
    return "\n".join(lines)


def _score_text(score: float, threshold: float | None, scale: str = "score") -> str:
    """``"z-score 1.83 > threshold 1.20"``, ``"score 0.400 <= threshold 1.20"`` or ``"score 0.400"``.

    Numbers have the tables' significant digits (:func:`.cells.format_number`), more where the
    score and the threshold would otherwise read the same.

    Example:
        >>> _score_text(1.2004, 1.2, "z-score")
        'z-score 1.2004 > threshold 1.2000'
    """
    if threshold is None:
        return f"{scale} {format_number(score)}"
    sign = ">" if score > threshold else "<="
    digits = 3
    score_text, threshold_text = format_number(score, digits), format_number(threshold, digits)
    while score != threshold and score_text == threshold_text and digits < 9:  # show the digits that differ
        digits += 1
        score_text, threshold_text = format_number(score, digits), format_number(threshold, digits)
    return f"{scale} {score_text} {sign} threshold {threshold_text}"


def _table(rows: list[dict[str, object]], css_class: str, caption: str) -> str:
    """An HTML table of ``rows``; columns in order of first appearance, headed with their unit; missing cells '-'.

    Every cell is written by :func:`.cells.format_cell`: metrics in [0, 1] in percent, numbers
    with a fixed number of significant digits; a :class:`SliceThumbnail` as its image (one colour
    scale per :func:`colour_key` over the table) captioned with its name.
    """
    if not rows:
        return f'<p class="empty">{html.escape(caption)}: no rows.</p>'
    thumbnails = [value for row in rows for value in row.values() if isinstance(value, SliceThumbnail)]
    limits = map_limits([thumbnail.view for thumbnail in thumbnails if thumbnail.view is not None])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(  # headings may break after an underscore, so that wide tables fit
        f'<th scope="col">{html.escape(column_label(column)).replace("_", "_<wbr>")}</th>' for column in columns
    )
    body = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if isinstance(value, SliceThumbnail):
                cells.append(f'<td class="slice">{_thumbnail_cell(value, limits)}</td>')
                continue
            text = html.escape(format_cell(column, value))
            cells.append(f'<td class="number">{text}</td>' if is_number(value) else f"<td>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="table-wrap"><table class="{css_class}" aria-label="{html.escape(caption)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def display_path(file: str, folder: Path) -> str:
    """``file`` relative to ``folder`` (the page's), with POSIX separators; a ``#frame`` suffix kept.

    Example:
        >>> display_path("/data/Brain_AD/test/good/img/001.png", Path("/data/results"))
        '../Brain_AD/test/good/img/001.png'
    """
    name, hash_sign, part = str(file).partition("#")
    try:
        relative = os.path.relpath(os.path.abspath(name), os.path.abspath(folder))
    except ValueError:  # another drive on Windows: no relative path exists
        return str(file)
    return Path(relative).as_posix() + hash_sign + part


def _png_uri(data: bytes) -> str:
    """``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image(css_class: str, data: bytes, alt: str, caption: str) -> str:
    """A figure with an embedded PNG, its alt text and a caption."""
    return (
        f'<figure><img class="{css_class}" src="{_png_uri(data)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _thumbnail_cell(thumbnail: SliceThumbnail, limits: dict[tuple[str, str], tuple[float, float]]) -> str:
    """A table cell's figure of ``thumbnail``; its name and why there is no image where there is none."""
    if thumbnail.image is None:
        reason = thumbnail.reason or "no image"
        return f'{html.escape(thumbnail.name)} <span class="empty">(not shown: {html.escape(reason)})</span>'
    over = "" if thumbnail.view is None else f" with the anomaly map of {thumbnail.view.name} over it"
    return _image("thumb", render_thumbnail(thumbnail, limits), f"{thumbnail.name}{over}", thumbnail.name)


def _label_text(label: int) -> str:
    return f"label {label} ({'anomalous' if label else 'normal'})"


def _gallery(section: ReportSection, folder: Path) -> str:
    """The section's tiles, grouped by kind (the known kinds first) and by the model whose decision it is.

    Every map of one scale is drawn in one colour scale over the section (:func:`colour_limits`).
    """
    limits = colour_limits(section.tiles)
    present = [tile.kind for tile in section.tiles]
    kinds = [kind for kind in KINDS if kind in present] + [kind for kind in dict.fromkeys(present) if kind not in KINDS]
    parts = []
    for kind in kinds:
        models = list(dict.fromkeys(tile.model for tile in section.tiles if tile.kind == kind))
        for model in models:
            tiles = [tile for tile in section.tiles if tile.kind == kind and tile.model == model]
            whose = "" if model is None else f" of {model}"
            parts.append(f"<h3>{html.escape(kind.capitalize())}s{html.escape(whose)} ({len(tiles)})</h3>")
            figures = []
            for tile in tiles:
                names = ", ".join(tile_map.name for tile_map in tile.maps) or "no model"
                file = display_path(tile.file, folder)
                alt = (
                    f"{tile.kind}, {file}, {_label_text(tile.label)}: the image, its ground-truth mask "
                    f"and the anomaly map of {names}"
                )
                caption = f"{tile.kind} · {file} · {_label_text(tile.label)}"
                figures.append(_image("tile", render_tile(tile, limits), alt, caption))
            parts.append(f'<div class="gallery">{"".join(figures)}</div>')
    if not kinds:
        parts.append('<p class="empty">No gallery images.</p>')
    return "".join(parts)


def _section(index: int, section: ReportSection, folder: Path) -> str:
    """One category's HTML: heading, summary table, curves and gallery."""
    category = html.escape(section.category)
    parts = [f'<section id="category-{index}"><h2>{category}</h2>']
    if section.summary is not None:
        parts.append(_table(section.summary, "summary", f"{section.category} summary"))
    if section.curves:
        figures = [
            _image("curve", Path(curve).read_bytes(), f"{section.category}: {Path(curve).stem}", Path(curve).name)
            for curve in section.curves
        ]
        parts.append(f'<h3>Curves</h3><div class="curves">{"".join(figures)}</div>')
    parts.append(_gallery(section, folder))
    parts.append("</section>")
    return "".join(parts)


def _scales(sections: list[ReportSection]) -> str:
    """One line per map name and scale of the galleries: what its scores, maps and thresholds are."""
    pairs = dict.fromkeys((tile_map.name, tile_map.scale) for section in sections for tile in section.tiles
                          for tile_map in tile.maps)  # fmt: skip
    if not pairs:
        return ""
    items = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(scale)}"
        + (f" ({html.escape(SCALE_NOTES[scale])})" if scale in SCALE_NOTES else "")
        + "</li>"
        for name, scale in pairs
    )
    return (
        '<section class="scales"><h3>Gallery scores</h3><p>Gallery scores, maps and thresholds are in these '
        "scales; maps of one scale share one colour scale in a category, and the magenta contour is the "
        f"map's pixel threshold. '{NOT_APPLICABLE}' in a table: not applicable.</p><ul>{items}</ul></section>"
    )


def _page(
    title: str,
    tables: dict[str, list[dict[str, object]]],
    sections: list[ReportSection],
    notes: list[str],
    folder: Path,
    warning: str | None = None,
) -> str:
    """The whole page as one string; paths are shown relative to ``folder``, the page's."""
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
    ]
    if warning:
        parts.append(f'<p class="warning" role="alert">{html.escape(warning)}</p>')
    parts += [
        f"<header><h1>{html.escape(title)}</h1>",
        f'<p class="generated">Written by anomalib-mvfa {html.escape(__version__)} on {written}.</p></header>',
    ]
    if notes:
        parts.append('<section class="notes">')
        parts.extend(f"<p>{html.escape(note)}</p>" for note in notes)
        parts.append("</section>")
    if sections:
        links = "".join(
            f'<li><a href="#category-{index}">{html.escape(section.category)}</a></li>'
            for index, section in enumerate(sections)
        )
        parts.append(f'<nav aria-label="categories"><ul>{links}</ul></nav>')
    if tables:
        parts.append("<section><h2>Results</h2>")
        for heading, rows in tables.items():
            parts.append(f"<h3>{html.escape(heading)}</h3>{_table(rows, 'results', heading)}")
        parts.append("</section>")
    parts.append(_scales(sections))
    parts.extend(_section(index, section, folder) for index, section in enumerate(sections))
    parts.append("</body></html>\n")
    return "\n".join(parts)
