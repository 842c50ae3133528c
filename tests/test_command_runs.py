"""What a user meets running the commands: run folders, categories, backbone defaults, help, failed jobs."""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from anomalib.models import AnomalibModule

from anomalib_mvfa.commands import COMMANDS, console, main
from anomalib_mvfa.commands.benchmark import BenchmarkConfig, failed_row, grid, summary_table
from anomalib_mvfa.commands.benchmark.runner import build_model
from anomalib_mvfa.commands.options import backbone_settings, evaluate
from anomalib_mvfa.commands.run_folder import new_run_folder
from anomalib_mvfa.data import MEDICAL_CATEGORIES

from .test_benchmark import mvtec_entry
from .test_evaluation import TINY

ROOT = Path(__file__).parents[1]
# only the backbone: what it implies (random weights, its size and layers) comes from the one preset
TINY_BACKBONE = ["--backbone", "tiny-random", "--k-shot", "2", "--epochs", "0"]
# every setting given (the tests of other behaviour do not depend on the preset)
TINY_GIVEN = [*TINY, "--k-shot", "2", "--epochs", "0"]
MVFA_GIVEN = {"backbone": "tiny-random", "pretrained": None, "image_size": 64, "feature_layers": [1, 2, 4], "k_shot": 2}


def run_from_repository(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    """Run Python with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, check=False, **kwargs)


# --------------------------------------------------------------------------- help


def test_the_help_of_every_command_imports_neither_torch_nor_anomalib_and_names_defaults() -> None:
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from anomalib_mvfa.commands import COMMANDS, main
        helps = {}
        for command in COMMANDS:
            text = io.StringIO()
            with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
                main([command, "--help"])
            helps[command] = text.getvalue()
        heavy = sorted(name for name in sys.modules if name.split(".")[0] in {"torch", "anomalib", "open_clip"})
        print(json.dumps({"heavy": heavy, "helps": helps}))
    """)
    result = run_from_repository("-c", code, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)
    assert answer["heavy"] == []
    assert set(answer["helps"]) == set(COMMANDS)
    for command, text in answer["helps"].items():
        assert f"usage: anomalib-mvfa {command}" in text
    flat = {command: " ".join(text.split()) for command, text in answer["helps"].items()}
    assert "--k-shot K_SHOT (default: 4)" in flat["evaluate"]
    assert "--image-size IMAGE_SIZE input side (default: 240; 64 for tiny-random)" in flat["evaluate"]
    assert "(default: results/evaluation)" in flat["evaluate"]
    assert "OUTPUT/v0, v1" in flat["benchmark"]


# --------------------------------------------------------------------------- backbone defaults


def _evaluate_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate(parser)
    return parser.parse_args(["--root", "data", *argv])


def test_tiny_random_implies_random_weights_its_size_and_layers_and_given_values_win() -> None:
    assert backbone_settings(_evaluate_args("--backbone", "tiny-random"), "openai", 240) == (None, 64, [1, 2, 3, 4])
    given = _evaluate_args("--backbone", "tiny-random", "--image-size", "32", "--feature-layers", "2", "4")
    assert backbone_settings(given, "openai", 240) == (None, 32, [2, 4])
    with_file = _evaluate_args("--backbone", "tiny-random", "--pretrained", "weights.pt")
    assert backbone_settings(with_file, "openai", 240)[0] == "weights.pt"
    paper = _evaluate_args("--backbone", "ViT-L-14-336")
    assert backbone_settings(paper, "openai", 240) == ("openai", 240, [6, 12, 18, 24])  # the paper's defaults


def test_a_benchmark_entry_with_the_tiny_backbone_alone_builds_offline() -> None:
    model = build_model({"class_path": "anomalib_mvfa.Mvfa", "init_args": {"backbone": "tiny-random"}}, False, 0)
    assert model.hparams["pretrained"] is None
    assert model.hparams["image_size"] == 64
    sized = build_model(
        {"class_path": "anomalib_mvfa.Mvfa", "init_args": {"backbone": "tiny-random", "image_size": 32}}, False, 0
    )
    assert sized.hparams["image_size"] == 32


# --------------------------------------------------------------------------- run folders


def test_new_run_folders_are_versions_with_a_latest_link(tmp_path) -> None:
    first, second = new_run_folder(tmp_path / "out"), new_run_folder(tmp_path / "out")
    assert (first.name, second.name) == ("v0", "v1")
    assert (tmp_path / "out" / "latest").resolve() == second.resolve()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        new_run_folder(tmp_path / "file")


def test_two_evaluations_into_one_output_keep_their_own_files(medical_root, tmp_path, capsys) -> None:
    output = tmp_path / "out"
    common = ["evaluate", "--root", str(medical_root), *TINY_GIVEN, "--output", str(output)]
    assert main([*common, "--categories", "Brain"]) == 0
    first = {path.relative_to(output): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert main([*common, "--categories", "Brain", "Liver", "--seeds", "1"]) == 0  # the same K: the same file names
    capsys.readouterr()
    assert sorted(path.name for path in output.iterdir()) == ["latest", "v0", "v1"]
    assert (output / "latest").resolve() == (output / "v1").resolve()
    for path, content in first.items():  # nothing of the first run replaced
        assert (output / path).read_bytes() == content, path
    with (output / "v0" / "few-shot_2shot_images.csv").open() as file:
        maps = [Path(row["map_ours"]) for row in csv.DictReader(file)]
    assert maps
    assert all((output / "v0") in path.parents and path.is_file() for path in maps)
    titles = [(output / name / "few-shot_2shot.md").read_text().splitlines()[0] for name in ("v0", "v1")]
    assert "; Average of 1 category: Brain (" in titles[0]
    assert "; Average of 2 categories: Brain, Liver (" in titles[1]


def test_evaluate_with_the_tiny_backbone_alone_runs_offline(medical_root, tmp_path) -> None:
    output = tmp_path / "out"
    assert (
        main(
            ["evaluate", "--root", str(medical_root), *TINY_BACKBONE, "--categories", "Brain", "--output", str(output)]
        )
        == 0
    )
    title = (output / "latest" / "few-shot_2shot.md").read_text().splitlines()[0]
    assert "RANDOM CLIP weights" in title


# --------------------------------------------------------------------------- categories


def test_categories_all_means_the_papers_six_and_names_the_missing_ones(medical_root, tmp_path, capsys) -> None:
    code = console(["evaluate", "--root", str(medical_root), *TINY_GIVEN, "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2
    assert "--categories all means the paper's six benchmark categories" in error
    present = {"Brain", "Liver", "Chest"}
    for category in MEDICAL_CATEGORIES:
        assert (f"{category}_AD" in error.split("but ", 1)[1]) == (category not in present), category
    assert not (tmp_path / "out").exists()  # refused before any run


# --------------------------------------------------------------------------- failed jobs


def test_failure_footnotes_keep_whole_messages(tmp_path) -> None:
    config = BenchmarkConfig(
        models=[{"class_path": "anomalib_mvfa.Mvfa"}], data=[{"class_path": "anomalib.data.MVTecAD"}],
        categories=["bottle"], output=str(tmp_path),
    )  # fmt: skip
    message = "the weights are missing; " + "x" * 400 + "\nHint: pass --pretrained none for random weights."
    row = failed_row(grid(config)[0], config, RuntimeError(message))
    table = summary_table([row])
    assert "Hint: pass --pretrained none for random weights." in table
    assert "x" * 400 in table


class FailsOnConstruction(AnomalibModule):
    """A model whose construction raises, as a job whose model cannot be made."""

    learning_type = trainer_arguments = None  # not abstract: construction reaches __init__

    def __init__(self, **_kwargs: object) -> None:
        msg = "this model cannot be made (FailsOnConstruction)"
        raise RuntimeError(msg)


def test_benchmark_exits_non_zero_naming_how_many_jobs_failed(mvtec_root, tmp_path, capsys) -> None:
    config = {
        "models": [{"class_path": "tests.test_command_runs.FailsOnConstruction"}],
        "data": [mvtec_entry(mvtec_root)],
        "categories": ["bottle"],
        "seeds": [0, 1],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    code = console(["benchmark", "--config", str(path), "--output", str(tmp_path / "out"), "--in-process"])
    assert code == 1
    assert "2 of 2 benchmark job(s) failed" in capsys.readouterr().err
    table = (tmp_path / "out" / "latest" / "benchmark.md").read_text()
    assert "this model cannot be made (FailsOnConstruction)" in table


def _session_processes(session: int) -> list[int]:
    """Process ids of a session (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":  # field 6 of stat: the session
                found.append(int(entry.name))
    return found


def test_sigterm_to_the_process_group_ends_every_job_process(mvtec_root, tmp_path) -> None:
    init_args = {**MVFA_GIVEN, "epochs": 10000}  # trains until stopped
    config = {
        "models": [{"class_path": "anomalib_mvfa.Mvfa", "init_args": init_args}],
        "data": [mvtec_entry(mvtec_root)],
    }
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({**config, "categories": ["bottle"], "output": str(tmp_path / "out")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "anomalib_mvfa", "benchmark", "--config", str(path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "out").rglob("support_set.json")):  # the job's trainer is fitting
            assert process.poll() is None, "the benchmark ended before its job trained"
            assert time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.5)
        time.sleep(1)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) != 0
        deadline = time.monotonic() + 30
        while _session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _session_processes(process.pid) == []
    finally:
        for pid in _session_processes(process.pid):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
