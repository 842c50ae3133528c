"""What ``evaluate`` and ``benchmark`` leave: per-image rows, curves and the report, checked independently.

Each command runs once per module, as a user would, with its output redirected to a file; the
tests recompute the printed AUROCs from the per-image rows and the curve points with scikit-learn.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import auc, roc_auc_score

from anomalib_mvfa.commands.progress import job_bar, overall_bar

from .browser import IMAGES_SCRIPT, TABLES_SCRIPT, broken_images, open_page
from .test_benchmark import MVFA_TINY, mvtec_entry
from .test_evaluation import TINY as EVALUATE_TINY
from .test_lightning import ANOMALIB_MVFA

PROGRESS_CONTROL = (b"\r", b"\x1b[")  # what a progress bar writes: carriage returns, terminal escapes


def run_redirected(log: Path, *args: object) -> str:
    """Run ``anomalib-mvfa`` with standard output and error redirected to ``log``; its text.

    (Read the bytes to look for control characters: reading text turns carriage returns into newlines.)
    """
    with log.open("w") as file:
        result = subprocess.run(
            [ANOMALIB_MVFA, *map(str, args)], stdout=file, stderr=subprocess.STDOUT, timeout=900, check=False
        )
    text = log.read_text()
    assert result.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def evaluation(medical_root, tmp_path_factory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("evaluation")
    text = run_redirected(
        output / "log.txt", "evaluate", "--root", medical_root, "--categories", "Brain", "Chest", "--k-shot", "2",
        "--seeds", "0", "1", "--epochs", "1", *EVALUATE_TINY, "--feature-pipeline", "clip", "--output", output,
    )  # fmt: skip
    return output / "latest", text


@pytest.mark.parametrize(
    ("command", "last_line"), [("evaluation", "== Chest, few-shot, seed 1"), ("benchmark", "[4/4]")]
)
def test_commands_write_no_progress_control_characters_into_a_file(command, last_line, request) -> None:
    output, text = request.getfixturevalue(command)
    assert last_line in text  # the command's own lines are there
    written = (output.parent / "log.txt").read_bytes()  # beside the run folder
    for control in PROGRESS_CONTROL:
        assert control not in written, repr(control)


def test_evaluate_per_image_scores_give_the_printed_aurocs(evaluation) -> None:
    output, _ = evaluation
    runs = pd.read_csv(output / "few-shot_2shot_runs.csv")
    images = pd.read_csv(output / "few-shot_2shot_images.csv")
    assert len(runs) == 4
    for run in runs.itertuples():
        rows = images[(images.category == run.category) & (images.seed == run.seed)]
        assert len(rows) > 0
        assert rows.file.is_unique
        for fusion in ("ours", "authors"):
            expected = getattr(run, f"{fusion}_AC")
            assert 100 * roc_auc_score(rows.label, rows[f"score_{fusion}"]) == pytest.approx(expected, abs=1e-4)
        # every row points at its saved map, and decisions follow the stated threshold
        assert all(Path(path).is_file() for path in rows.map_ours)
        decided = rows.dropna(subset=["threshold_ours"])
        assert len(decided) == len(rows)  # the fit validated: a threshold from the validation split
        assert ((decided.score_ours > decided.threshold_ours).astype(int) == decided.decision_ours).all()
    first = images.iloc[0]
    assert np.load(first.map_ours).ndim == 2


def test_evaluate_curve_points_have_the_printed_areas(evaluation) -> None:
    output, _ = evaluation
    runs = pd.read_csv(output / "few-shot_2shot_runs.csv")
    points = pd.read_csv(output / "curves" / "curves.csv")
    for run in runs.itertuples():
        for fusion in ("ours", "authors"):
            for level, metric in (("image", "AC"), ("pixel", "AS")):
                expected = getattr(run, f"{fusion}_{metric}")
                curve = points[
                    (points.category == run.category) & (points.seed == run.seed) & (points.series == fusion)
                    & (points.level == level) & (points.kind == "roc")
                ]  # fmt: skip
                if pd.isna(expected):  # Chest has no masks: no pixel curve
                    assert curve.empty
                    continue
                # every pixel of the small split is a curve point here (fewer than the sample limit)
                assert 100 * auc(curve.x, curve.y) == pytest.approx(expected, abs=1e-4), (run, fusion, level)
    assert {"Brain_image_roc.png", "Brain_pixel_pr.png", "Chest_image_roc.png"} <= {
        path.name for path in (output / "curves").glob("*.png")
    }
    assert not (output / "curves" / "Chest_pixel_roc.png").exists()


def test_evaluate_pixel_summaries_are_those_of_the_saved_maps(evaluation) -> None:
    output, _ = evaluation
    runs = pd.read_csv(output / "few-shot_2shot_runs.csv").set_index(["category", "seed"])
    pixels = pd.read_csv(output / "few-shot_2shot_pixels.csv")
    assert set(pixels.category) == {"Brain"}  # Chest has no masks
    for row in pixels.itertuples():
        assert 100 * row.pixel_AUROC == pytest.approx(runs.loc[(row.category, row.seed), "ours_AS"], abs=1e-4)
        assert 0 <= row.AUPRO <= 1
        assert 0 <= row.Dice <= 1


def test_the_evaluation_report_opens_in_a_browser_whole(evaluation, browser) -> None:
    output, text = evaluation
    page = output / "few-shot_2shot_report.html"
    assert f"report {page.resolve()}" in text  # the run's own folder, vN, where latest points
    open_page(browser, page)
    (results,) = browser.execute_script(TABLES_SCRIPT)
    assert [row[0] for row in results["rows"]] == ["Brain", "Chest", "Average"]
    summaries = browser.execute_script("return document.querySelectorAll('table.summary').length")
    assert summaries == 1  # Brain's pixel figures; Chest has no masks
    images = browser.execute_script(IMAGES_SCRIPT)
    assert broken_images(images) == []
    curves = [image for image in images if image["kind"] == "curve"]
    assert len(curves) == len(list((output / "curves").glob("*.png"))) == 6  # Brain: image and pixel, Chest: image
    assert any(image["kind"] == "tile" for image in images)
    browser.save_screenshot(output / "report.png")


@pytest.fixture(scope="module")
def benchmark(mvtec_root, tmp_path_factory) -> tuple[Path, str]:
    output = tmp_path_factory.mktemp("benchmark")
    config = {
        "models": [
            {"class_path": "anomalib_mvfa.Mvfa", "init_args": MVFA_TINY},
            {"class_path": "anomalib.models.Patchcore", "init_args": {"backbone": "resnet18", "layers": ["layer2"]}},
        ],
        "data": [mvtec_entry(mvtec_root)],
        "categories": ["bottle"],
        "seeds": [0, 1],
        "random_weights": True,
        "output": str(output),
    }
    (output / "bench.yaml").write_text(yaml.safe_dump(config))
    text = run_redirected(output / "log.txt", "benchmark", "--config", output / "bench.yaml", "--in-process")
    return output / "latest", text


def test_benchmark_per_image_scores_and_curves_give_the_printed_aurocs(benchmark) -> None:
    output, _ = benchmark
    table = pd.read_csv(output / "benchmark.csv")
    images = pd.read_csv(output / "benchmark_images.csv")
    points = pd.read_csv(output / "curves" / "curves.csv")
    assert len(table) == 4
    for job in table.itertuples():
        rows = images[(images.model == job.model) & (images.seed == job.seed)]
        assert len(rows) > 0
        assert roc_auc_score(rows.label, rows.score) == pytest.approx(job.image_AUROC, abs=1e-6)
        image_roc = points[(points.level == "image") & (points.kind == "roc")]
        curve = image_roc[(image_roc.series == job.model) & (image_roc.seed == job.seed)]
        assert auc(curve.x, curve.y) == pytest.approx(job.image_AUROC, abs=1e-6)
        assert all(Path(path).is_file() for path in rows["map"])
        assert ((rows.score > rows.threshold).astype(int) == rows.decision).all()


def test_the_benchmark_report_shows_the_models_side_by_side(benchmark, browser) -> None:
    output, _ = benchmark
    open_page(browser, output / "benchmark_report.html")
    (results, *_) = browser.execute_script(TABLES_SCRIPT)
    assert sorted(row[0] for row in results["rows"]) == ["Mvfa (authors)", "Patchcore"]
    images = browser.execute_script(IMAGES_SCRIPT)
    assert broken_images(images) == []
    tiles = [image for image in images if image["kind"] == "tile"]
    assert tiles
    # each gallery image shows both models: its tile is as wide as image + mask + two maps
    gallery = browser.execute_script("return Array.from(document.querySelectorAll('img.tile')).map(i => i.alt)")
    assert all("Mvfa (authors)" in alt and "Patchcore" in alt for alt in gallery), gallery
    browser.save_screenshot(output / "report.png")


class Terminal(io.StringIO):
    """What a terminal looks like to the progress bars."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_are_drawn_on_a_terminal_only(terminal, monkeypatch) -> None:
    stream = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with overall_bar(3, "evaluate") as bar:
        for _ in job_bar(range(4), 4, "scoring the test split"):
            pass
        bar.update(3)
    drawn = stream.getvalue()
    if terminal:
        assert "\r" in drawn
        assert "3/3 jobs" in drawn
        assert "elapsed" in drawn
        assert "left" in drawn
        assert "scoring the test split" in drawn
    else:
        assert drawn == ""


def test_benchmark_pixel_figures_are_those_anomalib_printed(benchmark) -> None:
    output, _ = benchmark
    table = pd.read_csv(output / "benchmark.csv")
    pixels = pd.read_csv(output / "benchmark_pixels.csv")
    assert len(pixels) == len(table)  # every job has masks
    for job in table.itertuples():
        (row,) = pixels[(pixels.model == job.model) & (pixels.seed == job.seed)].itertuples()
        # the same normalised maps and masks as anomalib's pixel AUROC (its ties at 0 and 1 included)
        assert row.pixel_AUROC == pytest.approx(job.pixel_AUROC, abs=1e-5)
        assert 0 <= row.AUPRO <= 1
        assert 0 <= row.Dice <= 1


def read_page(page: Path) -> tuple[str, list[str], list[str], list[str]]:
    """The page's text, its table headings (``th``), its gallery headings (``h3``) and its captions."""
    text = page.read_text(encoding="utf-8")
    strip = lambda found: [re.sub(r"<[^>]+>", "", item) for item in found]  # noqa: E731
    return (
        text,
        strip(re.findall(r"<th[^>]*>(.*?)</th>", text)),
        strip(re.findall(r"<h3>(.*?)</h3>", text)),
        strip(re.findall(r"<figcaption>(.*?)</figcaption>", text)),
    )


@pytest.mark.parametrize(
    ("command", "page_name", "model", "scale"),
    [
        ("evaluation", "few-shot_2shot_report.html", "ours", "z-score"),
        ("benchmark", "benchmark_report.html", "Mvfa (authors)", "normalised"),
    ],
)
def test_the_report_pages_read_alike(command, page_name, model, scale, request) -> None:
    """Percent in every AUROC heading, a warning first, whose gallery it is, scales explained, relative paths."""
    output, _ = request.getfixturevalue(command)
    page = output / page_name
    text, heads, headings, captions = read_page(page)
    metrics = [head for head in heads if re.search(r"AUROC|AUPRO|Dice|F1Score|\bA[CS]\b", head)]
    assert metrics
    assert all(head.endswith("(%)") for head in metrics), metrics
    assert text.split("<body>", 1)[1].lstrip().startswith('<p class="warning" role="alert">Random')
    assert any(re.fullmatch(rf"(False|True) (positive|negative)s of {re.escape(model)} \(\d+\)", h) for h in headings)
    assert f"<li><b>{model}</b>: {scale} (" in text.replace("&#x27;", "'")
    tiles = [caption for caption in captions if " · " in caption]  # a tile's: kind · file · label
    assert tiles
    for caption in tiles:
        file = caption.split(" · ")[1]
        assert not Path(file).is_absolute(), file
        assert (page.parent / file.partition("#")[0]).is_file(), file
    numbers = re.findall(r'<td class="number">([\d.]+)(?: ± [\d.]+)?</td>', text)
    assert numbers
    decimals = [n for n in numbers if "." in n]  # not the seeds' counts
    assert decimals
    significant = [n for n in decimals if float(n) != 0]  # a zero (a Dice of 0, say) reads "0.00"
    assert significant
    assert all(len(n.replace(".", "").lstrip("0")) == 3 or float(n) >= 100 for n in significant), decimals


def test_the_benchmark_table_fits_a_1400_pixel_window(benchmark, browser, request) -> None:
    output, _ = benchmark
    size = browser.get_window_size()
    browser.set_window_size(1400, 1600)
    request.addfinalizer(lambda: browser.set_window_size(size["width"], size["height"]))  # the module's browser
    open_page(browser, output / "benchmark_report.html")
    fits = browser.execute_script(
        "return Array.from(document.querySelectorAll('.table-wrap')).map(wrap => "
        "[wrap.scrollWidth <= wrap.clientWidth, wrap.getBoundingClientRect().right <= window.innerWidth]);"
    )
    assert fits
    assert all(all(pair) for pair in fits), fits
    weights = browser.execute_script(
        "const head = Array.from(document.querySelectorAll('table.results th'))"
        ".find(th => th.textContent === 'weights');"
        "return head.getBoundingClientRect().right <= head.closest('.table-wrap').getBoundingClientRect().right;"
    )
    assert weights, "the weights column is cut off"
