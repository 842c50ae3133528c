"""The ``benchmark`` package: its modules import each other one way only, and a job owns its run folder."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

from anomalib_mvfa.commands import console
from anomalib_mvfa.commands.benchmark import BenchmarkConfig, failed_row, grid, write_benchmark_report

PACKAGE = Path(__file__).parents[1] / "anomalib_mvfa" / "commands" / "benchmark"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__")


def _sibling_imports(module: str) -> set[str]:
    """The modules of the benchmark package that ``module`` imports (``from .x import``, ``from . import x``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [alias.name for alias in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anomalib_mvfa.commands.benchmark."):
            names.add(node.module.rsplit(".", 1)[1])
    return names & set(MODULES)


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(_sibling_imports(start))
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _sibling_imports(module)
    return seen


def test_no_module_of_the_benchmark_package_imports_itself_through_the_others() -> None:
    assert {"config", "jobs", "runner", "report", "command"} <= set(MODULES)
    for module in MODULES:
        assert module not in _reachable(module), f"{module} is part of an import cycle"


def test_the_report_and_the_tables_do_not_import_the_runner_or_the_command() -> None:
    for module in ("report", "tables", "jobs", "config"):
        assert not _reachable(module) & {"runner", "command"}, module
    assert _reachable("config") == set()  # the config stands alone (no torch)


def test_each_module_of_the_benchmark_package_imports_first() -> None:
    code = textwrap.dedent(f"""
        import importlib, sys
        for first in {MODULES!r}:
            for name in [name for name in sys.modules if name.startswith("anomalib_mvfa.commands.benchmark")]:
                del sys.modules[name]
            importlib.import_module("anomalib_mvfa.commands.benchmark." + first)
            importlib.import_module("anomalib_mvfa.commands.benchmark").run
            print("imported", first)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split().count("imported") == len(MODULES)


def test_a_job_names_its_run_folder_and_files_from_the_config(tmp_path) -> None:
    config = BenchmarkConfig(
        models=[{"class_path": "anomalib_mvfa.Mvfa"}, {"class_path": "anomalib.models.Patchcore"}],
        data=[{"class_path": "anomalib.data.MVTecAD"}],
        categories=["bottle", "cable"],
        seeds=[0, 1],
        output=str(tmp_path / "out"),
    )
    jobs = grid(config)
    assert [(job.category, job.model_name, job.seed) for job in jobs[:5]] == [
        ("bottle", "Mvfa", 0),
        ("bottle", "Mvfa", 1),
        ("bottle", "Patchcore", 0),
        ("bottle", "Patchcore", 1),
        ("cable", "Mvfa", 0),
    ]
    job = jobs[3]
    assert job.root == tmp_path / "out" / "runs" / "Patchcore" / "bottle" / "seed1"
    assert job.images_file.parent == job.root
    assert job.pixels_file.parent == job.root
    assert job.images_file != job.pixels_file
    assert job.maps_dir.parent == job.root
    assert job.describe() == "Patchcore on MVTecAD bottle seed 1"
    row = failed_row(job, config, RuntimeError("out of memory\nmore"))
    assert (row["model"], row["data"], row["category"], row["seed"]) == ("Patchcore", "MVTecAD", "bottle", 1)
    assert row["error"] == "RuntimeError: out of memory more"  # the whole message, on one line


def test_the_report_reads_each_job_from_its_own_files(tmp_path) -> None:
    config = BenchmarkConfig(
        models=[{"class_path": "anomalib_mvfa.Mvfa"}], data=[{"class_path": "anomalib.data.MVTecAD"}],
        categories=["bottle"], seeds=[0, 1], output=str(tmp_path),
    )  # fmt: skip
    jobs = grid(config)
    rows = []
    for job, scores in zip(jobs, ([0.1, 0.9, 0.2, 0.8], [0.9, 0.1, 0.2, 0.8]), strict=True):
        job.root.mkdir(parents=True)
        lines = ["file,label,score,threshold,decision,map,mask"]
        lines += [f"img{i}.png,{i % 2},{score},0.5,{int(score > 0.5)},," for i, score in enumerate(scores)]
        job.images_file.write_text("\n".join(lines) + "\n")
        torch.save({"scores": torch.empty(0), "targets": torch.empty(0), "summary": None}, job.pixels_file)
        rows.append({"model": "Mvfa", "data": "MVTecAD", "category": "bottle", "seed": job.seed, "error": ""})
    page = write_benchmark_report(jobs, rows, tmp_path, [{"model": "Mvfa"}])
    assert page is not None
    assert page.is_file()
    images = (tmp_path / "benchmark_images.csv").read_text().splitlines()
    assert len(images) == 1 + 8
    assert [line.split(",")[3] for line in images[1:]] == ["0"] * 4 + ["1"] * 4  # each job's own seed
    assert [line.split(",")[-5] for line in images[1:]] == ["0.1", "0.9", "0.2", "0.8", "0.9", "0.1", "0.2", "0.8"]


def test_a_config_that_names_no_job_is_refused_by_name(tmp_path, capsys) -> None:
    path = tmp_path / "grid.yaml"
    config = {"models": [{"class_path": "anomalib.models.Patchcore"}], "data": [{}], "seeds": []}
    path.write_text(yaml.safe_dump(config))
    assert console(["benchmark", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert f"Benchmark config '{path}' names no job" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_wheel_lists_every_package_of_the_source_tree() -> None:
    root = PACKAGE.parents[2]
    text = (root / "pyproject.toml").read_text()
    section = text[text.index("[tool.setuptools]") :]
    listed = section[section.index("packages = [") :].split("\n]", 1)[0]
    for init in sorted((root / "anomalib_mvfa").rglob("__init__.py")):
        dotted = ".".join(init.parent.relative_to(root).parts)
        assert f'"{dotted}"' in listed, f"{dotted} is missing from [tool.setuptools] packages"


def test_the_markdown_table_shows_accuracy_in_percent_with_three_significant_digits() -> None:
    from anomalib_mvfa.commands.benchmark import summary_table  # noqa: PLC0415

    def row(seed: int, auroc: float, seconds: float, speed: float, memory: float) -> dict:
        return {
            "model": "Mvfa", "data": "MVTecAD", "category": "bottle", "seed": seed, "weights": "pretrained",
            "image_AUROC": auroc, "pixel_AUROC": "", "image_F1Score": 1.0, "fit_seconds": seconds,
            "images_per_second": speed, "peak_memory_mb": memory, "error": "",
        }  # fmt: skip

    table = summary_table([row(0, 0.9, 14.1, 0.0044, 1033.1), row(1, 1.0, 14.5, 0.0115, 1033.6)])
    header, _, line = table.splitlines()[:3]
    cells = dict(zip(header.strip("| ").split(" | "), line.strip("| ").split(" | "), strict=True))
    assert cells["image_AUROC (%)"] == "95.0 ± 7.1"
    assert cells["image_F1Score (%)"] == "100 ± 0"
    assert cells["pixel_AUROC (%)"] == "-"  # no job has it: not applicable
    assert cells["fit_seconds"] == "14.3 ± 0.3"
    assert cells["images_per_second"] == "0.00795 ± 0.00502"
    assert cells["peak_memory_mb"] == "1033 ± 0"
