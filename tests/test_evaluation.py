"""The evaluation protocol: both fusions against independent computations, and the command."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomalib_mvfa import Mvfa
from anomalib_mvfa.commands import console, main
from anomalib_mvfa.commands.evaluate import SplitScores, auroc_metrics, fusion_metrics

from .conftest import save_checkpoint_file

TINY_MODEL = {"backbone": "tiny-random", "pretrained": None, "image_size": 64, "feature_layers": (1, 2, 4)}
TINY = ["--backbone", "tiny-random", "--pretrained", "none", "--image-size", "64", "--feature-layers", "1", "2", "4"]


def random_outputs(with_masks: bool, few_shot: bool = True) -> SplitScores:
    generator = torch.Generator().manual_seed(4)
    count, side = 10, 6
    labels = torch.tensor([0, 1] * (count // 2))
    masks = (torch.rand(count, side, side, generator=generator) > 0.8) & labels.bool()[:, None, None]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 3 + 1

    return SplitScores(
        labels=labels,
        masks=masks if with_masks else None,
        zero_shot_score=rand(count),
        zero_shot_map=rand(count, side, side),
        few_shot_score=rand(count) if few_shot else None,
        few_shot_map=rand(count, side, side) if few_shot else None,
        score=rand(count),
        anomaly_map=rand(count, side, side),
    )


def numpy_min_max(values: np.ndarray) -> np.ndarray:
    return (values - values.min()) / (values.max() - values.min())


@pytest.mark.parametrize("with_masks", [True, False])
def test_authors_fusion_against_an_independent_computation(with_masks) -> None:
    outputs = random_outputs(with_masks)
    metrics = fusion_metrics(outputs)
    labels = outputs.labels.numpy()
    zs_map, fs_map = outputs.zero_shot_map.numpy(), outputs.few_shot_map.numpy()
    fused_map = 0.5 * numpy_min_max(zs_map) + 0.5 * numpy_min_max(fs_map)
    if with_masks:
        image_scores = fused_map.reshape(len(labels), -1).max(axis=1)
        expected_as = 100 * roc_auc_score(outputs.masks.numpy().ravel(), fused_map.ravel())
        assert metrics["authors"]["AS"] == pytest.approx(expected_as, abs=1e-4)
        expected_ours_as = 100 * roc_auc_score(outputs.masks.numpy().ravel(), outputs.anomaly_map.numpy().ravel())
        assert metrics["ours"]["AS"] == pytest.approx(expected_ours_as, abs=1e-4)
    else:
        image_scores = 0.5 * numpy_min_max(outputs.zero_shot_score.numpy()) + 0.5 * numpy_min_max(
            outputs.few_shot_score.numpy()
        )
        assert "AS" not in metrics["authors"]
    assert metrics["authors"]["AC"] == pytest.approx(100 * roc_auc_score(labels, image_scores), abs=1e-4)
    assert metrics["ours"]["AC"] == pytest.approx(100 * roc_auc_score(labels, outputs.score.numpy()), abs=1e-4)


def test_authors_zero_shot_uses_the_zero_shot_branch_alone() -> None:
    outputs = random_outputs(with_masks=True, few_shot=False)
    metrics = fusion_metrics(outputs)
    labels = outputs.labels.numpy()
    image_scores = outputs.zero_shot_map.numpy().reshape(len(labels), -1).max(axis=1)
    assert metrics["authors"]["AC"] == pytest.approx(100 * roc_auc_score(labels, image_scores), abs=1e-4)


def test_evaluate_command_reports_both_fusions_over_seeds(medical_root, tmp_path, capsys) -> None:
    code = main([
        "evaluate", "--root", str(medical_root), "--categories", "Brain", "Chest", "--k-shot", "2",
        "--seeds", "0", "1", "--epochs", "1", *TINY, "--feature-pipeline", "clip", "--output", str(tmp_path),
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0
    table = (tmp_path / "latest" / "few-shot_2shot.md").read_text()
    assert "| dataset | ours AC | ours AS | authors AC | authors AS |" in table
    assert "RANDOM CLIP weights" in table
    assert "feature pipeline clip" in table.splitlines()[0]
    brain = next(line for line in table.splitlines() if line.startswith("| Brain"))
    chest = next(line for line in table.splitlines() if line.startswith("| Chest"))
    assert brain.count("±") == 4  # mean ± std over two seeds, AC and AS, both fusions
    assert chest.split("|")[3].strip() == "-"  # no AS without masks
    assert any(line.startswith("| Average") for line in table.splitlines())
    with (tmp_path / "latest" / "few-shot_2shot_runs.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["category"], row["seed"]) for row in rows] == [
        ("Brain", "0"),
        ("Brain", "1"),
        ("Chest", "0"),
        ("Chest", "1"),
    ]
    assert table.splitlines()[0] in output


def test_authors_layout_adapters_give_the_same_predictions_as_weights_set_by_hand(tmp_path) -> None:
    generator = torch.Generator().manual_seed(9)
    layout = {
        branch: {
            **{f"{i}.fc1.0.weight": torch.randn(32, 48, generator=generator) * 0.1 for i in range(3)},
            **{f"{i}.fc2.0.weight": torch.randn(48, 32, generator=generator) * 0.1 for i in range(3)},
        }
        for branch in ("seg_adapters", "det_adapters")
    }
    torch.save(layout, tmp_path / "Brain.pth")
    tiny = {"backbone": "tiny-random", "pretrained": None, "image_size": 64, "feature_layers": (1, 2, 4)}
    loaded = Mvfa(**tiny, epochs=0, adapter_checkpoint=str(tmp_path / "Brain.pth"))
    loaded.setup("test")  # as a trainer does first: the adapter file is read here
    by_hand = Mvfa(**tiny, epochs=0)
    for branch, adapters in (
        ("seg_adapters", by_hand.model.seg_adapters),
        ("det_adapters", by_hand.model.det_adapters),
    ):
        for i, adapter in enumerate(adapters):
            adapter.fc1[0].weight.data.copy_(layout[branch][f"{i}.fc1.0.weight"])
            adapter.fc2[0].weight.data.copy_(layout[branch][f"{i}.fc2.0.weight"])
    for model in (loaded, by_hand):
        model.model.setup("Brain")
    images = torch.randn(2, 3, 64, 64, generator=generator)
    first, second = loaded.model.branch_outputs(images), by_hand.model.branch_outputs(images)
    assert torch.equal(first.zero_shot_map, second.zero_shot_map)
    assert torch.equal(first.zero_shot_score, second.zero_shot_score)

    wrong = Mvfa(**{**tiny, "feature_layers": (2, 4)}, epochs=0)
    with pytest.raises(ValueError, match=r"Brain\.pth.*3 layer\(s\).*expects 2 layer\(s\)"):
        wrong.model.load_adapters(tmp_path / "Brain.pth")


def test_evaluate_reports_unreadable_inputs_in_one_line(medical_root, tmp_path, capsys) -> None:
    truncated = tmp_path / "model.ckpt"
    save_checkpoint_file(Mvfa(**TINY_MODEL, k_shot=2, epochs=0), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])  # cut, as a full disk or an interrupted copy leaves it
    for extra, expected in (
        (["--ckpt-path", str(truncated)], f"Checkpoint '{truncated}' is not a file written by torch.save (not a zip"),
        (["--adapter-checkpoint", "adapters/{cat}.pth"], "--adapter-checkpoint 'adapters/{cat}.pth' is not a valid"),
    ):
        code = console(["evaluate", "--root", str(medical_root), "--categories", "Brain", *TINY, *extra])
        captured = capsys.readouterr()
        assert code == 2
        assert captured.err.startswith(f"anomalib-mvfa: error: {expected}")
        assert "Traceback" not in captured.out + captured.err


def test_evaluate_title_comes_from_the_evaluated_checkpoint(medical_root, tmp_path) -> None:
    model = Mvfa(**TINY_MODEL, k_shot=2, epochs=0, class_name="Brain")
    model.setup()  # text features, as a fit leaves them
    path = save_checkpoint_file(model, tmp_path / "model.ckpt")
    code = main([
        "evaluate", "--root", str(medical_root), "--categories", "Brain", "--ckpt-path", str(path),
        "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0
    title = (tmp_path / "out" / "latest" / "few-shot_2shot.md").read_text().splitlines()[0]
    assert "2-shot" in title  # the checkpoint's K, not the command's default of 4
    assert "RANDOM CLIP weights" in title  # the checkpoint's CLIP is random, although --pretrained says openai


def test_aurocs_of_scores_above_the_sigmoid_range_are_exact() -> None:
    """torchmetrics' sigmoid rounds float32 scores above ~17 to 1.0; the tables must not turn them into ties."""
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(400, generator=generator) < 0.3).long()
    scores = torch.randn(400, generator=generator) * 10 + 20 + 5 * labels  # z-scores, most above 17
    outputs = replace(random_outputs(with_masks=False), labels=labels, score=scores)
    expected = 100 * roc_auc_score(labels.numpy(), scores.numpy())
    assert auroc_metrics(outputs.score, outputs.anomaly_map, outputs)["AC"] == pytest.approx(expected, abs=1e-4)
