"""The HTML report page: it opens in a real browser with every image intact, and needs no other file."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from anomalib_mvfa.reports.page import (
    GalleryTile,
    ReportSection,
    TileMap,
    _score_text,
    render_tile,
    write_report,
)

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
    assert tables[0]["rows"][0] == ["Brain", "0.9123", "", "12"]
    assert tables[0]["rows"][1] == ["Liver", "0.5", "0.6667", "40"]
    assert tables[1]["rows"][0] == ["Brain", "123.5", "0.0001235", "12"]

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
    assert _score_text(0.4, 1.2) == "score 0.40 <= threshold 1.20"
    assert _score_text(0.4, None) == "score 0.40"
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
    assert [caption for caption in captions if raw in caption[0]] == [[f"false positive · {raw} · label 0 (normal)", 0]]
    assert browser.execute_script("return document.querySelectorAll('h2')[1].textContent") == "Brain <MRI>"
