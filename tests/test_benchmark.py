"""``anomalib-mvfa benchmark``: a grid of models over a generated dataset."""

from __future__ import annotations

import csv
import os

import pytest
import yaml
from anomalib.models import AnomalibModule

from anomalib_mvfa.commands import main
from anomalib_mvfa.commands.benchmark import METRICS


def mvtec_entry(root: object) -> dict:
    """The generated MVTec AD dataset as a benchmark data entry."""
    return {
        "class_path": "anomalib.data.MVTecAD",
        "init_args": {"root": str(root), "val_split_mode": "from_test", "num_workers": 0},
    }


MVFA_TINY = {"backbone": "tiny-random", "image_size": 64, "feature_layers": [1, 2, 4], "k_shot": 2, "epochs": 1}


def test_benchmark_writes_both_tables_with_every_column(mvtec_root, tmp_path, capsys) -> None:
    config = {
        "models": [
            {"class_path": "anomalib_mvfa.Mvfa", "init_args": MVFA_TINY},
            {"class_path": "anomalib.models.Patchcore", "init_args": {"backbone": "resnet18", "layers": ["layer2"]}},
        ],
        "data": [
            {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {"root": str(mvtec_root), "val_split_mode": "from_test", "num_workers": 0,
                              "train_batch_size": 4, "eval_batch_size": 4},
            }
        ],
        "categories": ["bottle"],
        "seeds": [0, 1],
    }  # fmt: skip
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main([
        "benchmark", "--config", str(path), "--random-weights", "--feature-pipeline", "clip",
        "--output", str(tmp_path / "out"), "--in-process",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0
    assert "[1/4] Mvfa on MVTecAD bottle seed 0" in output
    with (tmp_path / "out" / "latest" / "benchmark.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["seed"]) for row in rows] == [
        ("Mvfa (clip)", "0"),  # the flag reaches the models that take a feature pipeline
        ("Mvfa (clip)", "1"),
        ("Patchcore", "0"),
        ("Patchcore", "1"),
    ]
    for row in rows:
        for metric in METRICS:
            assert float(row[metric]) >= 0.0, metric
        assert row["weights"] == "random (accuracy not meaningful)"
    table = (tmp_path / "out" / "latest" / "benchmark.md").read_text()
    header = table.splitlines()[0]
    assert all(metric in header for metric in METRICS)
    assert sum(line.startswith(("| Mvfa", "| Patchcore")) for line in table.splitlines()) == 2
    assert "accuracy columns mean nothing" in table


def test_benchmark_config_errors_name_the_problem(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("categories: [bottle]\n")
    with pytest.raises(ValueError, match=r"empty\.yaml.*\['models', 'data'\]"):
        main(["benchmark", "--config", str(path)])


def test_benchmark_workers_give_the_rows_of_a_sequential_run(mvtec_root, tmp_path, capsys) -> None:
    config = {
        "models": [{"class_path": "anomalib_mvfa.Mvfa", "init_args": MVFA_TINY}],
        "data": [mvtec_entry(mvtec_root)],
        "categories": ["bottle"],
        "seeds": [0, 1],
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    tables = {}
    for workers in ("1", "2"):  # one after another in this process, then two job processes at a time
        output = tmp_path / f"workers{workers}"
        how = ["--in-process"] if workers == "1" else ["--workers", workers]
        code = main(["benchmark", "--config", str(path), "--random-weights", "--output", str(output), *how])
        assert code == 0
        with (output / "latest" / "benchmark.csv").open() as file:
            tables[workers] = list(csv.DictReader(file))
    assert "2 job(s) on CPU, 2 at a time, each in its own process" in capsys.readouterr().out
    accuracy = ("model", "seed", "image_AUROC", "pixel_AUROC", "image_F1Score")
    sequential, parallel = ([tuple(row[key] for key in accuracy) for row in tables[w]] for w in ("1", "2"))
    assert parallel == sequential  # same jobs, same seeds, same results, in grid order
    assert [row[1] for row in parallel] == ["0", "1"]
    with pytest.raises(ValueError, match="--workers must be at least 1, got 0"):
        main(["benchmark", "--config", str(path), "--random-weights", "--workers", "0"])


class DiesOnConstruction(AnomalibModule):
    """A model whose construction ends its process at once, as the kernel's out-of-memory killer would."""

    learning_type = trainer_arguments = None  # not abstract: construction reaches __init__

    def __init__(self, **_kwargs: object) -> None:
        os._exit(9)


def test_each_job_runs_in_its_own_process_and_a_dead_one_is_reported(mvtec_root, tmp_path, capsys) -> None:
    config = {
        "models": [
            {"class_path": "tests.test_benchmark.DiesOnConstruction"},
            {"class_path": "anomalib_mvfa.Mvfa", "init_args": MVFA_TINY},
        ],
        "data": [mvtec_entry(mvtec_root)],
        "categories": ["bottle"],
        "seeds": [0],
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["benchmark", "--config", str(path), "--random-weights", "--output", str(tmp_path / "out")])
    assert code == 1  # this process survived the job whose process died, and says that a job failed
    with (tmp_path / "out" / "latest" / "benchmark.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], bool(row["error"])) for row in rows] == [
        ("DiesOnConstruction", True),
        ("Mvfa (authors)", False),
    ]
    assert "process died" in rows[0]["error"]
    assert float(rows[1]["image_AUROC"]) >= 0.0  # the next job ran as usual
    table = (tmp_path / "out" / "latest" / "benchmark.md").read_text()
    assert "- DiesOnConstruction on MVTecAD bottle seed 0: its process died" in table.split("Failed jobs")[1]
    assert "FAILED" in capsys.readouterr().out


def test_rows_are_labelled_from_the_weights_each_model_was_given(mvtec_root, tmp_path) -> None:
    """Without --random-weights, a model configured without pretrained weights is still labelled random."""
    config = {
        "models": [
            {"class_path": "anomalib_mvfa.Mvfa", "init_args": {**MVFA_TINY, "pretrained": None}},
            {"class_path": "tests.test_benchmark.DiesOnConstruction", "init_args": {"pretrained": None}},
        ],
        "data": [mvtec_entry(mvtec_root)],
        "categories": ["bottle"],
        "seeds": [0],
    }
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["benchmark", "--config", str(path), "--output", str(tmp_path / "out")]) == 1  # one job failed
    with (tmp_path / "out" / "latest" / "benchmark.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["weights"]) for row in rows] == [
        ("Mvfa (authors)", "random (accuracy not meaningful)"),
        ("DiesOnConstruction", "random (accuracy not meaningful)"),  # a failed job: from its init_args
    ]
    assert "their accuracy columns mean nothing" in (tmp_path / "out" / "latest" / "benchmark.md").read_text()


def test_benchmark_started_by_a_multi_process_launcher_stops_before_any_job(tmp_path, capsys, monkeypatch) -> None:
    """Under torchrun every process would run every job and write the tables: it must refuse, once."""
    config = {"models": [{"class_path": "anomalib_mvfa.Mvfa", "init_args": MVFA_TINY}], "data": [mvtec_entry(tmp_path)]}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({**config, "random_weights": True, "output": str(tmp_path / "out")}))
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun and Lightning's ddp launcher set
    assert main(["benchmark", "--config", str(path)]) == 2
    assert "started as 2 processes" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # no job ran, nothing written
