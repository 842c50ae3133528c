"""One self-contained HTML page of an evaluation or benchmark run, for people to read.

The page holds a title, notes, the results tables and, per category, the curve images and a
gallery of the worst false positives, the worst false negatives and a few true positives. Every
image is embedded as a ``data:image/png`` URI and the style sheet is inline, so the page opens
from disk, offline, with no other file and no script.

A gallery tile is one test image: the image, its ground-truth mask, then one panel per model (or
fusion) with that model's anomaly map over the image, so a benchmark shows the models side by
side on the same image.

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .. import __version__
from ..errors import MvfaInputError

# gallery groups, in the order the page shows them; other kinds follow in order of appearance
KINDS = ("false positive", "false negative", "true positive")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# inches per panel of a gallery tile, and its resolution
PANEL_SIZE = 2.4
TILE_DPI = 100

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125;
       max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 3rem; line-height: 1.45; }
header { border-bottom: 1px solid #d0d4d9; margin-bottom: 1rem; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #d0d4d9; padding-bottom: 0.2rem; margin-top: 2.5rem; }
.generated { color: #5f6871; font-size: 0.85rem; margin-top: 0; }
nav ul { display: flex; flex-wrap: wrap; gap: 0.3rem 1rem; list-style: none; padding: 0; }
.notes p { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5rem 0.8rem; white-space: pre-line; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d4d9; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f1f3f5; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1rem; }
.gallery { display: grid; grid-template-columns: 1fr; gap: 1.2rem; }
figure { margin: 0; }
figcaption { font-size: 0.85rem; color: #3b434b; margin-top: 0.2rem; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; display: block; border: 1px solid #e3e6e9; }
.empty { color: #5f6871; font-style: italic; }
"""


@dataclass
class TileMap:
    """One model's (or fusion's) view of a gallery image.

    Attributes:
        name: the model or fusion, e.g. ``"ours"`` or ``"Patchcore"``.
        anomaly_map: ``H x W`` float map, any range (shown min-max scaled per tile).
        score: the image score.
        threshold: the image threshold of that score, ``None`` when the run has none.
        decision: 1 anomalous, 0 normal, ``None`` when the run made none.

    Example:
        >>> TileMap("ours", np.zeros((32, 32)), score=1.83, threshold=1.2, decision=1).name
        'ours'
    """

    name: str
    anomaly_map: np.ndarray
    score: float
    threshold: float | None
    decision: int | None


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


def render_tile(tile: GalleryTile) -> bytes:
    """PNG bytes of one gallery tile: the image, the ground-truth mask, then one panel per map.

    Each map panel shows the image with the anomaly map overlaid (min-max scaled over this tile,
    as its colour bar says), titled with the map's name, the score against the threshold and the
    decision. Drawn with :class:`matplotlib.figure.Figure` (no pyplot, no global state).

    Raises:
        ValueError: the image is not ``H x W x 3``, or a mask or map is not the image's ``H x W``.

    Example:
        >>> tile = GalleryTile("true positive", "a.png", 1, np.random.rand(32, 32, 3), None,
        ...                    [TileMap("ours", np.random.rand(32, 32), 1.83, 1.2, 1)])
        >>> render_tile(tile)[1:4]
        b'PNG'
    """
    _check_tile(tile)
    image = _display_image(tile.image)
    panels = 2 + len(tile.maps)
    figure = Figure(figsize=(PANEL_SIZE * panels, PANEL_SIZE + 0.7), dpi=TILE_DPI, layout="constrained")
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
        scaled, low, high = _min_max_scaled(tile_map.anomaly_map)
        axis.imshow(image)
        overlay = axis.imshow(scaled, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axis.set_title(_map_title(tile_map), fontsize=9)
        bar = figure.colorbar(overlay, ax=axis, fraction=0.046, pad=0.03, ticks=[0, 0.5, 1])
        bar.set_label(f"min-max per tile\n({_number(low)} .. {_number(high)})", fontsize=7)
        bar.ax.tick_params(labelsize=7)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=TILE_DPI, bbox_inches="tight", pad_inches=0.05)
    return buffer.getvalue()


def write_report(
    path: Path,
    title: str,
    tables: dict[str, list[dict[str, object]]],
    sections: list[ReportSection],
    notes: list[str] | None = None,
) -> Path:
    """Write the report page to ``path`` atomically: it appears whole or not at all.

    Args:
        path: the HTML file to write (its folder is made).
        title: the page's title and heading.
        tables: table heading -> rows (dicts with the same keys), shown as ``<table class="results">``;
            floats are shown to 4 significant digits, ``None`` as an empty cell.
        sections: one per category: summary table, curve images and gallery (grouped by kind).
        notes: plain-text paragraphs shown under the title (e.g. that a run used random weights).

    Returns:
        ``path``.

    Raises:
        ValueError: a curve file is missing or not a PNG, or a gallery tile's image, mask or map
            has the wrong shape. Every input is checked before anything is written.

    Example:
        >>> write_report(Path("results/report.html"), "MVFA, 4-shot", {"AC": rows}, sections,
        ...              notes=["Random weights: the scores say nothing about the method."])  # doctest: +SKIP
        PosixPath('results/report.html')
    """
    from ..utils import write_atomically  # noqa: PLC0415 (the utils module loads anomalib and lightning)

    path = Path(path)
    for section in sections:
        for curve in section.curves:
            _check_curve(section.category, Path(curve))
        for tile in section.tiles:
            try:
                _check_tile(tile)
            except ValueError as error:
                msg = f"category {section.category!r}: {error}"
                raise MvfaInputError(msg) from error

    page = _page(title, tables, sections, notes or [])
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


def _display_image(image: np.ndarray) -> np.ndarray:
    """The image as floats in [0, 1] (8-bit images are scaled; anything else is clipped)."""
    image = np.asarray(image)
    if np.issubdtype(image.dtype, np.integer):
        image = image / 255.0
    return np.clip(np.nan_to_num(image.astype(np.float64)), 0.0, 1.0)


def _min_max_scaled(anomaly_map: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The map scaled to [0, 1] over its finite values, with the original low and high."""
    values = np.asarray(anomaly_map, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape), math.nan, math.nan
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else 1.0
    return np.clip(np.nan_to_num((values - low) / span, nan=0.0), 0.0, 1.0), low, high


def _map_title(tile_map: TileMap) -> str:
    """The panel title: name, score against threshold, and the decision when there is one."""
    lines = [tile_map.name, _score_text(tile_map.score, tile_map.threshold)]
    if tile_map.decision is not None:
        lines.append("predicted anomalous" if tile_map.decision else "predicted normal")
    return "\n".join(lines)


def _score_text(score: float, threshold: float | None) -> str:
    """``"score 1.83 > threshold 1.20"``, ``"score 0.40 <= threshold 1.20"`` or ``"score 0.40"``.

    Example:
        >>> _score_text(1.2004, 1.2)
        'score 1.2004 > threshold 1.2000'
    """
    if threshold is None:
        return f"score {_number(score)}"
    sign = ">" if score > threshold else "<="
    score_text, threshold_text = _number(score), _number(threshold)
    decimals = 2
    while score != threshold and score_text == threshold_text and decimals < 8:  # show the digits that differ
        decimals += 1
        score_text, threshold_text = _number(score, decimals), _number(threshold, decimals)
    return f"score {score_text} {sign} threshold {threshold_text}"


def _number(value: float, decimals: int = 2) -> str:
    """A score for a title: fixed decimals in the usual range, scientific notation outside it."""
    value = float(value)
    if value != 0 and math.isfinite(value) and not 1e-2 <= abs(value) < 1e4:
        return f"{value:.{decimals + 1}g}"
    return f"{value:.{decimals}f}"


def _cell(value: object) -> tuple[str, bool]:
    """A table cell's text and whether it is a number (right-aligned)."""
    if value is None:
        return "", False
    if isinstance(value, bool | np.bool_):
        return str(bool(value)), False
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}", True
    if isinstance(value, int | np.integer):
        return str(int(value)), True
    return str(value), False


def _table(rows: list[dict[str, object]], css_class: str, caption: str) -> str:
    """An HTML table of ``rows``; columns in order of first appearance, missing cells empty."""
    if not rows:
        return f'<p class="empty">{html.escape(caption)}: no rows.</p>'
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f'<th scope="col">{html.escape(str(column))}</th>' for column in columns)
    body = []
    for row in rows:
        cells = []
        for column in columns:
            text, number = _cell(row.get(column))
            cells.append(f'<td class="number">{html.escape(text)}</td>' if number else f"<td>{html.escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="table-wrap"><table class="{css_class}" aria-label="{html.escape(caption)}">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _png_uri(data: bytes) -> str:
    """``data:image/png;base64,...``."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _image(css_class: str, data: bytes, alt: str, caption: str) -> str:
    """A figure with an embedded PNG, its alt text and a caption."""
    return (
        f'<figure><img class="{css_class}" src="{_png_uri(data)}" alt="{html.escape(alt)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _label_text(label: int) -> str:
    return f"label {label} ({'anomalous' if label else 'normal'})"


def _gallery(section: ReportSection) -> str:
    """The section's tiles, grouped by kind (the known kinds first)."""
    present = [tile.kind for tile in section.tiles]
    kinds = [kind for kind in KINDS if kind in present] + [kind for kind in dict.fromkeys(present) if kind not in KINDS]
    parts = []
    for kind in kinds:
        tiles = [tile for tile in section.tiles if tile.kind == kind]
        parts.append(f"<h3>{html.escape(kind.capitalize())}s ({len(tiles)})</h3>")
        figures = []
        for tile in tiles:
            names = ", ".join(tile_map.name for tile_map in tile.maps) or "no model"
            alt = (
                f"{tile.kind}, {tile.file}, {_label_text(tile.label)}: the image, its ground-truth mask "
                f"and the anomaly map of {names}"
            )
            caption = f"{tile.kind} · {tile.file} · {_label_text(tile.label)}"
            figures.append(_image("tile", render_tile(tile), alt, caption))
        parts.append(f'<div class="gallery">{"".join(figures)}</div>')
    if not kinds:
        parts.append('<p class="empty">No gallery images.</p>')
    return "".join(parts)


def _section(index: int, section: ReportSection) -> str:
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
    parts.append(_gallery(section))
    parts.append("</section>")
    return "".join(parts)


def _page(
    title: str, tables: dict[str, list[dict[str, object]]], sections: list[ReportSection], notes: list[str]
) -> str:
    """The whole page as one string."""
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
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
    parts.extend(_section(index, section) for index, section in enumerate(sections))
    parts.append("</body></html>\n")
    return "\n".join(parts)
