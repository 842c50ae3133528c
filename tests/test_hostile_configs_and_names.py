"""What users' names and configs cannot do: start spreadsheet formulas in CSVs, run commands from a benchmark."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import yaml

import anomalib_mvfa
from anomalib_mvfa.commands import console
from anomalib_mvfa.commands.benchmark import BenchmarkConfig
from anomalib_mvfa.errors import MvfaInputError
from anomalib_mvfa.reports.curves import CurvePlot, CurveSeries, write_curve_points
from anomalib_mvfa.utils import write_rows

FORMULAS = ['=HYPERLINK("http://example.invalid")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(1,1)", "\tx", "\rx"]


def _cells(path: Path) -> list[list[str]]:
    with path.open(newline="") as file:
        return list(csv.reader(file))


def test_csv_cells_that_would_start_a_formula_are_quoted(tmp_path: Path) -> None:
    rows = [{"file": name, "label": 1, "score": -0.5, "threshold": "-0.25"} for name in FORMULAS]
    cells = _cells(write_rows(tmp_path / "images.csv", rows))
    assert [row[0] for row in cells[1:]] == ["'" + name for name in FORMULAS]
    assert {(row[2], row[3]) for row in cells[1:]} == {("-0.5", "-0.25")}  # numbers stay numbers


def test_curve_points_quote_names_that_would_start_a_formula(tmp_path: Path) -> None:
    series = CurveSeries("=ours", [0], [torch.tensor([0.1, 0.9, 0.4, 0.6])], [torch.tensor([0, 1, 0, 1])])
    path = write_curve_points([CurvePlot("@Brain", "image", [series])], tmp_path / "curves.csv")
    cells = _cells(path)
    column = {name: index for index, name in enumerate(cells[0])}
    assert {(row[column["category"]], row[column["series"]]) for row in cells[1:]} == {("'@Brain", "'=ours")}
    assert any(float(row[column["x"]]) == 0 for row in cells[1:])


def test_every_csv_the_package_writes_goes_through_one_writer() -> None:
    package = Path(anomalib_mvfa.__file__).parent
    writers = {
        f"{path.relative_to(package)}"
        for path in package.rglob("*.py")
        if re.search(r"csv\.(writer|DictWriter)\(|\.to_csv\(", path.read_text())
    }
    assert writers == {"utils.py", "reports/curves.py"}  # write_rows and the curve points, both quoting


def benchmark_config(tmp_path: Path, model: str, data: str = "anomalib.data.MVTecAD") -> Path:
    marker = tmp_path / "marker"
    config = {
        "models": [{"class_path": model, "init_args": {"command": f"touch {marker}"}}],
        "data": [{"class_path": data, "init_args": {"root": str(tmp_path / "data")}}],
        "output": str(tmp_path / "out"),
    }
    (tmp_path / "benchmark.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "benchmark.yaml"


def test_a_benchmark_config_cannot_run_a_command(tmp_path: Path, capsys) -> None:
    path = benchmark_config(tmp_path, "os.system")
    code = console(["benchmark", "--config", str(path), "--in-process"])
    assert not (tmp_path / "marker").exists(), "the config ran a command"
    assert code == 2
    assert capsys.readouterr().err == (
        "anomalib-mvfa: error: class_path 'os.system' is not an anomalib model (a subclass of "
        "anomalib.models.components.base.anomalib_module.AnomalibModule): a benchmark config makes only models and "
        "datamodules, as anomalib's command line does.\n"
    )


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ("anomalib.data.MVTecAD", "anomalib.data.MVTecAD", r"'anomalib\.data\.MVTecAD' is not an anomalib model"),
        (
            "anomalib.models.Patchcore",
            "anomalib.models.Patchcore",
            r"'anomalib\.models\.Patchcore' is not an anomalib ",
        ),
        ("anomalib_mvfa.Mvfa", "subprocess.run", r"'subprocess\.run' is not an anomalib datamodule"),
    ],
)
def test_benchmark_configs_name_only_models_and_datamodules(
    tmp_path: Path, model: str, data: str, message: str
) -> None:
    with pytest.raises(MvfaInputError, match=message):
        BenchmarkConfig.from_file(benchmark_config(tmp_path, model, data))
    assert not (tmp_path / "marker").exists()
