"""The HTML report page: it opens in a real browser with every image intact, and needs no other file."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib as mpl
import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from anomalib_mvfa.data import ScanReader
from anomalib_mvfa.reports.page import (
    THUMBNAIL_PIXELS,
    GalleryTile,
    ReportSection,
    SliceThumbnail,
    TileMap,
    _score_text,
    colour_limits,
    render_tile,
    write_report,
)
from anomalib_mvfa.reports.report import slice_thumbnail

from .browser import IMAGES_SCRIPT, TABLES_SCRIPT, broken_images, open_page

SIZE = 32


def write_curve(path: Path, seed: int) -> Path:
    """A small ROC-like curve PNG, as the curves module would write it."""
    rng = np.random.default_rng(seed)
    false_positive_rate = np.sort(rng.random(20))
    figure = Figure(figsize=(3, 3), dpi=60)
    axis = figure.subplots()
    axis.plot(false_positive_rate, np.sqrt(false_positive_rate))
    axis.set_title(path.stem)
    figure.savefig(path, format="png")
    return path


def make_tile(
    rng: np.random.Generator, kind: str, file: str, models: tuple[str, ...], mask: bool = True
) -> GalleryTile:
    """A random 32 x 32 gallery tile with one map per model."""
    label = int(kind != "false positive")
    truth = np.zeros((SIZE, SIZE), dtype=bool)
    truth[8:20, 10:24] = bool(label)
    decision = int(kind != "false negative")
    maps = [  # a third model has no threshold
        TileMap(name, rng.random((SIZE, SIZE)) * 5, float(rng.random() * 3), None if index == 2 else 1.2, decision)
        for index, name in enumerate(models)
    ]
    return GalleryTile(kind, file, label, rng.random((SIZE, SIZE, 3)), truth if mask else None, maps)


def make_report(tmp_path: Path, tiles_file: str = "scan_000.png") -> dict[str, object]:
    """Two categories: one evaluation-like (one model), one benchmark-like (three models side by side)."""
    rng = np.random.default_rng(0)
    curves = tmp_path / "curves"
    curves.mkdir(exist_ok=True)
    brain = ReportSection(
        "Brain",
        curves=[write_curve(curves / "Brain_roc.png", 0), write_curve(curves / "Brain_pr.png", 1)],
        tiles=[
            make_tile(rng, "false positive", tiles_file, ("ours",)),
            make_tile(rng, "false negative", "scan_001.png", ("ours",)),
            make_tile(rng, "true positive", "scan_002.png", ("ours",), mask=False),
        ],
        summary=[{"pixel AUROC": 0.87654321, "AUPRO": None, "Dice": 0.25}],
    )
    liver = ReportSection(
        "Liver",
        curves=[write_curve(curves / "Liver_roc.png", 2)],
        tiles=[
            make_tile(rng, "true positive", "liver_010.png", ("ours", "authors", "Patchcore")),
            make_tile(rng, "false negative", "liver_011.png", ("ours", "authors", "Patchcore")),
        ],
    )
    tables = {
        "Image AUROC (AC)": [
            {"category": "Brain", "ours": 0.912345, "authors": None, "images": 12},
            {"category": "Liver", "ours": 0.5, "authors": 0.66666666, "images": 40},
        ],
        "Pixel AUROC (AS)": [{"category": "Brain", "ours": 123.456789, "authors": 0.0001234567, "images": 12}],
    }
    return {
        "title": "MVFA, 4-shot",
        "tables": tables,
        "sections": [brain, liver],
        "notes": ["Random weights: these scores say nothing about the method."],
    }


def test_page_renders_in_a_browser(browser, tmp_path: Path) -> None:
    report = make_report(tmp_path)
    page = write_report(tmp_path / "out" / "report.html", **report)
    open_page(browser, page)

    tables = browser.execute_script(TABLES_SCRIPT)
    assert [len(table["rows"]) for table in tables] == [2, 1]
    assert tables[0]["head"] == ["category", "ours", "authors", "images"]
    assert tables[0]["rows"][0] == ["Brain", "0.912", "-", "12"]
    assert tables[0]["rows"][1] == ["Liver", "0.500", "0.667", "40"]
    assert tables[1]["rows"][0] == ["Brain", "123", "0.000123", "12"]

    images = browser.execute_script(IMAGES_SCRIPT)
    assert broken_images(images) == []
    assert sum(image["kind"] == "curve" for image in images) == 3
    assert sum(image["kind"] == "tile" for image in images) == 5
    assert all(image["alt"].strip() for image in images)
    assert browser.execute_script("return document.querySelectorAll('h2').length") >= 2

    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        extrema = shot.convert("RGB").getextrema()
    assert any(low < high for low, high in extrema), "the screenshot is a single colour"


def test_broken_image_is_detected(browser, tmp_path: Path) -> None:
    """The image check can fail: a page whose first curve's PNG data is cut short shows it broken."""
    report = make_report(tmp_path)
    page = write_report(tmp_path / "report.html", **report)
    text = page.read_text(encoding="utf-8")
    corrupted, count = re.subn(
        r'(<img class="curve" src="data:image/png;base64,)([A-Za-z0-9+/=]+)', r"\1iVBORw0KGgoAAAAN", text, count=1
    )
    assert count == 1
    page.write_text(corrupted, encoding="utf-8")
    open_page(browser, page)

    broken = broken_images(browser.execute_script(IMAGES_SCRIPT))
    assert [(image["kind"], image["alt"]) for image in broken] == [("curve", "Brain: Brain_roc")]


def test_page_is_self_contained(browser, tmp_path: Path) -> None:
    report = make_report(tmp_path)
    page = write_report(tmp_path / "out" / "report.html", **report)
    text = page.read_text(encoding="utf-8")

    class Links(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.targets: list[tuple[str, str, str]] = []
            self.tags: set[str] = set()

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags.add(tag)
            self.targets += [(tag, name, value or "") for name, value in attrs if name in {"src", "href", "srcset"}]

    parser = Links()
    parser.feed(text)
    assert parser.targets, "the page has no images or links at all"
    outside = [target for target in parser.targets if not target[2].startswith(("data:image/png;base64,", "#"))]
    assert outside == []
    assert not parser.tags & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"url\(|@import", text)

    for curve in (tmp_path / "curves").iterdir():
        curve.unlink()
    open_page(browser, page)
    images = browser.execute_script(IMAGES_SCRIPT)
    assert len(images) == 8
    assert broken_images(images) == []


def test_tile_has_one_panel_per_map_and_shows_the_mask() -> None:
    rng = np.random.default_rng(1)
    one = make_tile(rng, "true positive", "a.png", ("ours",))
    two = make_tile(rng, "true positive", "a.png", ("ours", "Patchcore"))
    with Image.open(io.BytesIO(render_tile(one))) as first, Image.open(io.BytesIO(render_tile(two))) as second:
        assert second.width > first.width

    full = GalleryTile(one.kind, one.file, 1, one.image, np.ones((SIZE, SIZE), dtype=bool), one.maps)
    empty = GalleryTile(one.kind, one.file, 1, one.image, np.zeros((SIZE, SIZE), dtype=bool), one.maps)
    shown = np.asarray(Image.open(io.BytesIO(render_tile(full))).convert("L"), dtype=float)
    hidden = np.asarray(Image.open(io.BytesIO(render_tile(empty))).convert("L"), dtype=float)
    rows, columns = np.nonzero(np.abs(shown - hidden) > 60)
    assert rows.size, "the mask changes nothing in the tile"
    top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
    width = shown.shape[1]
    assert width / 5 < left < right < 4 * width / 5, "the mask is not drawn in the middle (mask) panel"
    assert 0.8 < (bottom - top) / (right - left) < 1.25, "the changed area is not the square mask panel"
    region = (slice(top, bottom + 1), slice(left, right + 1))
    assert shown[region].mean() > 200
    assert hidden[region].mean() < 50


def test_score_text_compares_with_the_threshold() -> None:
    assert _score_text(1.83, 1.2) == "score 1.83 > threshold 1.20"
    assert _score_text(0.4, 1.2, "z-score") == "z-score 0.400 <= threshold 1.20"
    assert _score_text(275.26, 85.6, "z-score") == "z-score 275 > threshold 85.6"
    assert _score_text(0.4, None, "test min-max") == "test min-max 0.400"
    assert _score_text(1.2004, 1.2) == "score 1.2004 > threshold 1.2000"


def _replace_tile(report: dict[str, object], **changes: object) -> None:
    tile = report["sections"][0].tiles[0]
    for name, value in changes.items():
        setattr(tile, name, value)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing curve", r"category 'Brain': curve file does not exist: .*absent_roc\.png"),
        ("curve not a PNG", r"category 'Brain': curve file is not a PNG image: .*notes\.txt"),
        ("grey image", r"tile 'scan_000\.png': image must be H x W x 3, got shape \(32, 32\)"),
        ("RGBA image", r"tile 'scan_000\.png': image must be H x W x 3, got shape \(32, 32, 4\)"),
        ("small mask", r"tile 'scan_000\.png': mask shape \(16, 16\) differs from the image's \(32, 32\)"),
        ("small map", r"tile 'scan_000\.png': anomaly map 'ours' has shape \(16, 32\), which differs"),
        ("small slice map", r"table 'Studies': image 'a\.dcm': anomaly map 'ours' has shape \(16, 32\), which differs"),
    ],
)
def test_bad_inputs_name_the_problem_and_write_nothing(tmp_path: Path, case: str, expected: str) -> None:
    report = make_report(tmp_path)
    curves = report["sections"][0].curves
    if case == "missing curve":
        curves.append(tmp_path / "absent_roc.png")
    elif case == "curve not a PNG":
        (tmp_path / "notes.txt").write_text("not an image")
        curves.append(tmp_path / "notes.txt")
    elif case == "grey image":
        _replace_tile(report, image=np.zeros((SIZE, SIZE)))
    elif case == "RGBA image":
        _replace_tile(report, image=np.zeros((SIZE, SIZE, 4)))
    elif case == "small mask":
        _replace_tile(report, mask=np.zeros((16, 16), dtype=bool))
    elif case == "small slice map":
        view = TileMap("ours", np.zeros((16, SIZE)), 1.0, None, None)
        report["tables"]["Studies"] = [
            {"study": "1.2", "highest slice": SliceThumbnail("a.dcm", np.zeros((SIZE, SIZE, 3)), view)}
        ]
    else:
        report["sections"][0].tiles[0].maps[0].anomaly_map = np.zeros((16, SIZE))

    out = tmp_path / "out"
    with pytest.raises(ValueError, match=expected):
        write_report(out / "report.html", **report)
    assert not out.exists() or list(out.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_page(tmp_path: Path) -> None:
    report = make_report(tmp_path)
    page = write_report(tmp_path / "out" / "report.html", **report)
    before = page.read_bytes()
    _replace_tile(report, mask=np.zeros((16, 16), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        write_report(page, **report)
    assert page.read_bytes() == before
    assert list(page.parent.iterdir()) == [page]

    with pytest.raises(ValueError, match="mask shape"):
        render_tile(report["sections"][0].tiles[0])


def test_text_is_escaped(browser, tmp_path: Path) -> None:
    raw = "<b>x&y</b>.png"
    report = make_report(tmp_path, tiles_file=raw)
    report["notes"] = ["<script>alert(1)</script> & friends"]
    report["sections"][0].category = "Brain <MRI>"
    page = write_report(tmp_path / "report.html", **report)
    text = page.read_text(encoding="utf-8")
    assert "&lt;b&gt;x&amp;y&lt;/b&gt;.png" in text
    assert raw not in text
    assert "<script>" not in text
    assert "Brain &lt;MRI&gt;" in text

    open_page(browser, page)
    captions = browser.execute_script(
        "return Array.from(document.querySelectorAll('figcaption')).map(c => [c.textContent, c.children.length]);"
    )
    shown = [caption for caption in captions if raw in caption[0]]  # a name relative to the working folder
    assert [(text.startswith("false positive · "), text.endswith(f"{raw} · label 0 (normal)"), children)
            for text, children in shown] == [(True, True, 0)]  # fmt: skip
    assert browser.execute_script("return document.querySelectorAll('h2')[1].textContent") == "Brain <MRI>"


class Cells(HTMLParser):
    """Every table of a page: its heading texts and its cells' texts, by ``class`` of the table."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[dict[str, object]] = []
        self.headings: list[str] = []
        self.captions: list[str] = []
        self._text: list[str] | None = None
        self._tag = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append({"class": dict(attrs).get("class"), "head": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        if tag in {"th", "td", "h3", "figcaption"}:
            self._text, self._tag = [], tag

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._tag or self._text is None:
            return
        text, self._text = "".join(self._text), None
        if tag == "th":
            self.tables[-1]["head"].append(text)
        elif tag == "td":
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "h3":
            self.headings.append(text)
        else:
            self.captions.append(text)


def parse_page(page: Path) -> Cells:
    parser = Cells()
    parser.feed(page.read_text(encoding="utf-8"))
    for table in parser.tables:
        table["rows"] = [row for row in table["rows"] if row]
    return parser


def significant_digits(text: str) -> int:
    """Significant digits of a plain decimal number's text (trailing zeros of a whole number count)."""
    digits = text.lstrip("-").replace(".", "").lstrip("0")
    return len(digits)


def test_every_table_shows_fractions_in_percent_with_three_significant_digits(tmp_path: Path) -> None:
    """AUROC, AUPRO and Dice are fractions in the summary and percent in the results: the page shows percent."""
    report = make_report(tmp_path)
    report["tables"] = {
        "Benchmark": [
            {"model": "Mvfa", "image_AUROC": 0.97894, "fit_seconds": 14.3312, "speed": 0.007919, "memory": 1033.4},
            {"model": "Patchcore", "image_AUROC": 1.0, "fit_seconds": 0.12345, "speed": 12.0, "memory": None},
        ]
    }
    report["sections"][0].summary = [{"seed": 0, "pixel_AUROC": 0.87654321, "AUPRO": None, "Dice": 0.25}]
    page = parse_page(write_report(tmp_path / "out" / "report.html", **report))
    results, summary = page.tables
    assert results["head"] == ["model", "image_AUROC (%)", "fit_seconds", "speed", "memory"]
    assert results["rows"] == [
        ["Mvfa", "97.9", "14.3", "0.00792", "1033"],
        ["Patchcore", "100", "0.123", "12.0", "-"],  # '-': not applicable
    ]
    assert summary["head"] == ["seed", "pixel_AUROC (%)", "AUPRO (%)", "Dice (%)"]
    assert summary["rows"] == [["0", "87.7", "-", "25.0"]]
    numbers = [cell for table in page.tables for row in table["rows"] for cell in row[1:] if cell[0].isdigit()]
    assert all(significant_digits(cell) == 3 or float(cell) >= 100 for cell in numbers), numbers


def test_gallery_headings_name_whose_mistakes_they_are(tmp_path: Path) -> None:
    report = make_report(tmp_path)
    for tile in report["sections"][1].tiles:
        tile.model = "Patchcore"
    page = parse_page(write_report(tmp_path / "out" / "report.html", **report))
    assert "True positives of Patchcore (1)" in page.headings
    assert "False negatives of Patchcore (1)" in page.headings
    assert "False positives (1)" in page.headings  # Brain's tiles name no model


def test_gallery_paths_are_relative_to_the_page(tmp_path: Path) -> None:
    image = tmp_path / "data" / "Brain_AD" / "test" / "scan 1.png"
    report = make_report(tmp_path, tiles_file=str(image))
    report["sections"][1].tiles[0].file = f"{tmp_path / 'volumes' / 'case.nii.gz'}#axial=080"
    page = parse_page(write_report(tmp_path / "out" / "report.html", **report))
    assert "false positive · ../data/Brain_AD/test/scan 1.png · label 0 (normal)" in page.captions
    assert any(" · ../volumes/case.nii.gz#axial=080 · " in caption for caption in page.captions)
    assert not [caption for caption in page.captions if str(tmp_path) in caption]


def test_the_page_says_what_the_gallery_scores_are_and_warns_first(tmp_path: Path) -> None:
    report = make_report(tmp_path)
    for tile in report["sections"][0].tiles:
        tile.maps[0].scale = "z-score"
    page = write_report(
        tmp_path / "out" / "report.html", warning="Random weights: the accuracy means nothing.", **report
    )
    text = page.read_text(encoding="utf-8")
    body = text.split("<body>", 1)[1]
    assert body.startswith('\n<p class="warning" role="alert">Random weights: the accuracy means nothing.</p>')
    scales = re.search(r'<section class="scales">(.*?)</section>', text, re.S)
    assert scales, "no explanation of the scores"
    assert "<b>ours</b>: z-score (the mean of the two branches&#x27; z-scores" in scales.group(1)
    assert "pixel threshold" in scales.group(1)


def saturated_colours(png: bytes) -> dict[tuple[int, int, int], int]:
    """How many pixels of each clearly coloured (not grey) colour a PNG has."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int).reshape(-1, 3)
    coloured = pixels[(pixels.max(axis=1) - pixels.min(axis=1)) > 40]
    colours, counts = np.unique(coloured, axis=0, return_counts=True)
    return {tuple(int(v) for v in colour): int(count) for colour, count in zip(colours, counts, strict=True)}


def page_tiles(page: Path) -> list[bytes]:
    import base64  # noqa: PLC0415

    found = re.findall(r'<img class="tile" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page.read_text())
    return [base64.b64decode(data) for data in found]


def test_one_colour_scale_for_every_tile_of_a_category(tmp_path: Path) -> None:
    """The same map value has the same colour in two tiles whose maps span different ranges."""
    image = np.full((SIZE, SIZE, 3), 0.5)
    tiles = []
    for index, corner in enumerate((0.0, 10.0)):  # value 5 everywhere, one corner pixel 0 or 10
        values = np.full((SIZE, SIZE), 5.0)
        values[0, 0] = corner
        tiles.append(
            GalleryTile("true positive", f"{index}.png", 1, image, None, [TileMap("ours", values, 5.0, 1.0, 1)])
        )
    page = write_report(tmp_path / "report.html", "colours", {}, [ReportSection("Brain", [], tiles)])
    first, second = (saturated_colours(png) for png in page_tiles(page))
    assert max(first, key=first.get) == max(second, key=second.get), "value 5 has two colours"
    assert max(first.values()) > 1000  # the map panel, not a line of the colour bar


def test_the_pixel_threshold_is_drawn_as_a_contour_on_each_map() -> None:
    rng = np.random.default_rng(3)
    values = np.zeros((SIZE, SIZE))
    values[8:24, 8:24] = 4.0
    tile = GalleryTile("true positive", "a.png", 1, rng.random((SIZE, SIZE, 3)) * 0.3, None, [])
    magenta = (255, 0, 255)
    counts = []
    for threshold in (None, 2.0):
        tile.maps = [TileMap("ours", values, 3.0, 1.0, 1, "z-score", threshold)]
        colours = saturated_colours(render_tile(tile))
        counts.append(
            sum(count for colour, count in colours.items() if np.abs(np.subtract(colour, magenta)).max() < 60)
        )
    assert counts[0] == 0
    assert counts[1] > 40  # the contour around the square (and the threshold's mark on the colour bar)


def test_models_of_one_named_scale_share_their_colours() -> None:
    """Maps of one named scale (anomalib's normalised scores) share limits across models; others keep their own."""
    low, high = np.zeros((SIZE, SIZE)), np.full((SIZE, SIZE), 3.0)
    high[0, 0] = -1.0
    maps = [
        TileMap("Mvfa", low, 0.2, 0.5, 0, scale="normalised"),
        TileMap("Patchcore", high, 0.9, 0.5, 1, scale="normalised"),
        TileMap("ours", low + 7.0, 7.0, None, None),
    ]
    tile = GalleryTile("false negative", "a.png", 1, np.zeros((SIZE, SIZE, 3)), None, maps)
    assert colour_limits([tile]) == {("normalised", ""): (-1.0, 3.0), ("score", "ours"): (7.0, 7.0)}


class SliceCells(HTMLParser):
    """The study table's picture cells (``<td class="slice">``): image data, alt text, caption and all text."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, object]] = []
        self._open = False
        self._in_caption = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "td":
            self._open = attributes.get("class") == "slice"
            if self._open:
                self.cells.append({"png": None, "alt": None, "caption": "", "text": ""})
        elif tag == "img" and self._open:
            source = attributes.get("src") or ""
            assert source.startswith("data:image/png;base64,"), source[:40]
            self.cells[-1]["png"] = base64.b64decode(source.split(",", 1)[1])
            self.cells[-1]["alt"] = attributes.get("alt")
        self._in_caption = self._open and (tag == "figcaption" or self._in_caption)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._open = False
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data: str) -> None:
        if self._open:
            self.cells[-1]["text"] += data
            if self._in_caption:
                self.cells[-1]["caption"] += data


def slice_cells(page: Path) -> list[dict[str, object]]:
    parser = SliceCells()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.cells


def decoded(png: bytes) -> np.ndarray:
    """A PNG as ``H x W x 3`` floats in [0, 1]."""
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def resized_slice(reader: ScanReader, name: str, size: int = THUMBNAIL_PIXELS) -> np.ndarray:
    """A sample read with ``reader``, resized with PIL (not the package's code) to ``size`` square, in [0, 1]."""
    image = reader.read_image(name).permute(1, 2, 0).numpy()
    channels = [Image.fromarray(image[..., c].astype(np.float32), mode="F") for c in range(3)]
    return np.stack([np.asarray(c.resize((size, size), Image.Resampling.BICUBIC)) for c in channels], -1).clip(0, 1)


def write_volume(path: Path, slices: int = 6) -> Path:
    """A NIfTI volume of 48 x 40 axial slices, each with a bright square at a place of its own on a ramp."""
    data = np.tile(np.linspace(0, 300, 48)[:, None, None], (1, 40, slices)).astype(np.float32)
    for index in range(slices):
        data[4 + 6 * index : 14 + 6 * index, 5 + 4 * index : 15 + 4 * index, index] = 1000
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def study_row(study: str, highest: object) -> dict[str, object]:
    return {"category": "CT", "seed": 0, "study": study, "score": 2.5, "highest slice": highest}


def test_the_study_table_shows_each_highest_slice_read_by_the_reader(tmp_path: Path) -> None:
    """Each row's picture is its slice: within 0.01 (mean, of [0, 1]) of the slice the reader gives, resized.

    The 0.01 allows for two bicubic resizes (torch's in the package, PIL's here) and 8-bit rounding (measured
    0.001); every other slice of the volume is more than 0.05 away (measured 0.066 and more). With a map, every
    pixel away from the map's edge is within 0.02 (measured 0.006) of half the slice plus half the map's jet
    colour (matplotlib's alpha 0.5), computed here from the colour map; with another slice under it, 0.03 or more.
    """
    volume = write_volume(tmp_path / "vol.nii.gz")
    reader = ScanReader()
    names = reader.samples(volume)
    assert names[3] == f"{volume}#axial=003"
    values = np.zeros((32, 32))
    values[:, 16:] = 4.0  # left half 0, right half 4: two colours of the map's scale
    view = TileMap("ours", values, 2.0, 1.0, 1, "z-score", None)
    rows = [
        study_row("vol", slice_thumbnail(names[3], reader, name="vol.nii.gz#axial=003")),
        study_row("vol", slice_thumbnail(names[1], reader, view, name="vol.nii.gz#axial=001")),
    ]
    page = write_report(tmp_path / "out" / "report.html", "studies", {"Studies": rows}, [])
    assert sorted(path.name for path in page.parent.iterdir()) == ["report.html"]  # embedded, as the gallery
    alone, overlaid = slice_cells(page)

    assert alone["caption"] == "vol.nii.gz#axial=003"
    assert alone["alt"] == "vol.nii.gz#axial=003"
    shown = decoded(alone["png"])
    assert shown.shape == (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS, 3)
    errors = [np.abs(shown - resized_slice(reader, name)).mean() for name in names]
    assert errors[3] < 0.01, errors
    assert min(error for index, error in enumerate(errors) if index != 3) > 0.05, errors

    assert overlaid["caption"] == "vol.nii.gz#axial=001"
    assert overlaid["alt"] == "vol.nii.gz#axial=001 with the anomaly map of ours over it"
    jet = mpl.colormaps["jet"]
    colour = np.zeros((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS, 3))
    colour[:, : THUMBNAIL_PIXELS // 2] = jet(0.0)[:3]
    colour[:, THUMBNAIL_PIXELS // 2 :] = jet(1.0)[:3]
    away = np.r_[0 : THUMBNAIL_PIXELS // 2 - 8, THUMBNAIL_PIXELS // 2 + 8 : THUMBNAIL_PIXELS]  # not the map's edge
    differences = [
        np.abs(decoded(overlaid["png"]) - (0.5 * resized_slice(reader, name) + 0.5 * colour))[:, away] for name in names
    ]
    assert differences[1].max() < 0.02, differences[1].max()
    assert min(difference.mean() for index, difference in enumerate(differences) if index != 1) > 0.02


def test_a_slice_that_cannot_be_read_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "gone.nii.gz"
    rows = [study_row("vol", slice_thumbnail(f"{missing}#axial=2", ScanReader(), name="gone.nii.gz#axial=2"))]
    page = write_report(tmp_path / "report.html", "studies", {"Studies": rows}, [])
    (cell,) = slice_cells(page)
    assert cell["png"] is None
    assert cell["text"].startswith("gone.nii.gz#axial=2 (not shown: ")
    assert cell["text"].endswith("NIfTI 'gone.nii.gz' cannot be read: No such file or no access: 'gone.nii.gz')")


def test_study_ids_and_slice_names_are_escaped(tmp_path: Path) -> None:
    name = "x<i>&\"y'.png"
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(tmp_path / name)
    study = "<b>1&2</b>"
    rows = [
        study_row(study, slice_thumbnail(str(tmp_path / name), ScanReader(), name=name)),
        study_row(study, slice_thumbnail(str(tmp_path / f"gone{name}"), ScanReader(), name=f"gone{name}")),
    ]
    page = write_report(tmp_path / "out" / "report.html", "studies", {"Studies": rows}, [])
    text = page.read_text(encoding="utf-8")
    for raw in (study, name, "<i>"):
        assert raw not in text
    assert "&lt;b&gt;1&amp;2&lt;/b&gt;" in text
    assert "x&lt;i&gt;&amp;&quot;y&#x27;.png" in text
    shown, gone = slice_cells(page)
    assert (shown["caption"], shown["alt"]) == (name, name)
    assert decoded(shown["png"]).mean() == pytest.approx(200 / 255, abs=0.01)
    assert gone["png"] is None
    assert gone["text"].startswith(f"gone{name} (not shown: Image '")  # the reason names the path, escaped too
    assert [row[2] for row in parse_page(page).tables[0]["rows"]] == [study, study]
