"""Mvfa through anomalib's Engine and CLI: training, checkpoints, prediction, export."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import TorchInferencer
from anomalib.engine import Engine

from anomalib_mvfa import FewShotMemoryBankCallback, Mvfa
from anomalib_mvfa.support import SupportSettings, draw_abnormal, draw_normal

from .conftest import TINY_CONFIG, TINY_IMAGE_SIZE, folder_datamodule, write_dataset

CONFIGS = Path(__file__).parents[1] / "configs"
ANOMALIB = str(Path(sys.executable).parent / "anomalib")
ANOMALIB_MVFA = str(Path(sys.executable).parent / "anomalib-mvfa")
TINY_MODEL = {
    "backbone": "tiny-random",
    "pretrained": None,
    "image_size": TINY_IMAGE_SIZE,
    "feature_layers": (1, 2, 4),
    "k_shot": 2,
}
TINY_CLI = [
    "--model.backbone", "tiny-random", "--model.pretrained", "null", "--model.image_size", "64",
    "--model.feature_layers", "[1,2,4]", "--model.k_shot", "2",
]  # fmt: skip
SMALL_DATA_CLI = ["--data.num_workers", "0", "--data.train_batch_size", "4", "--data.eval_batch_size", "4"]
EXPORT_TOLERANCE = 1e-4


def run_anomalib(*args: object, program: str = ANOMALIB) -> str:
    """Run the anomalib CLI (or ``program``) in a subprocess, offline; its output; fail with it on error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [program, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def mvtec(root: Path) -> MVTecAD:
    return MVTecAD(root=root, category="bottle", train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


def engine(root: Path) -> Engine:
    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def adapter_weights(model: Mvfa) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.model.seg_adapters.parameters()])


def checkpoint_of(run_root: Path) -> Path:
    (path,) = run_root.rglob("model.ckpt")
    return path


@pytest.mark.parametrize(
    ("config", "dataset"),
    [
        ("mvfa_mvtec_few_shot.yaml", "mvtec"),
        ("mvfa_folder_few_shot.yaml", "folder"),
        ("mvfa_normal_only.yaml", "folder"),
    ],
)
def test_cli_train_with_shipped_configs(config, dataset, mvtec_root, folder_root, tmp_path) -> None:
    root = mvtec_root if dataset == "mvtec" else folder_root
    data_args = (
        [] if dataset == "mvtec" else ["--data.abnormal_dir", "test/broken", "--data.mask_dir", "ground_truth/broken"]
    )
    output = run_anomalib(
        "train", "--config", CONFIGS / config, *TINY_CLI, "--model.epochs", "2", *SMALL_DATA_CLI,
        "--data.root", root, *data_args, "--trainer.accelerator", "cpu", "--default_root_dir", tmp_path,
    )  # fmt: skip
    losses = dict(re.findall(r"Mvfa epoch (\d)/2: loss (\d+\.\d+)", output))  # counted from 1
    assert sorted(losses) == ["1", "2"]
    for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert re.search(rf"{metric}\s*│\s*\d\.\d+", output), metric
    assert checkpoint_of(tmp_path).is_file()
    support = json.loads(next(tmp_path.rglob("support_set.json")).read_text())
    assert len(support["normal"]) == 2
    assert len(support["abnormal"]) == 2
    expected_abnormal = "perlin(" if "normal_only" in config else "/test/broken/"
    assert all(expected_abnormal in name for name in support["abnormal"])


def test_engine_training_changes_adapters_and_checkpoint_reloads(tmp_path) -> None:
    # A local weights file: the checkpoint leaves CLIP out and loading takes it from that file.
    torch.manual_seed(3)
    weights = tmp_path / "tiny-clip.pt"
    torch.save(open_clip.CLIP(**TINY_CONFIG).state_dict(), weights)
    data_root = write_dataset(tmp_path / "data", "mvtec")
    model = Mvfa(**{**TINY_MODEL, "pretrained": str(weights)}, epochs=2)
    before = adapter_weights(model)
    engine(tmp_path / "run").fit(model, datamodule=mvtec(data_root))
    assert not torch.equal(before, adapter_weights(model))
    assert model.model.has_memory_bank

    checkpoint_path = checkpoint_of(tmp_path / "run")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert not any(key.startswith("model.clip.") for key in checkpoint["state_dict"])
    loaded = Mvfa.load_from_checkpoint(checkpoint_path).eval()
    images = torch.rand(3, 3, 80, 80, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = model.eval()(images), loaded(images)
    assert torch.allclose(expected.pred_score, actual.pred_score, atol=1e-6)
    assert torch.allclose(expected.anomaly_map, actual.anomaly_map, atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, mvtec_root) -> None:
    model = Mvfa(**TINY_MODEL, epochs=1)
    engine(tmp_path).fit(model, datamodule=mvtec(mvtec_root))
    other = Mvfa(**{**TINY_MODEL, "feature_layers": (2, 4)}, epochs=1)
    with pytest.raises(ValueError, match=r"feature_layers: checkpoint \[1, 2, 4\], model \[2, 4\]"):
        engine(tmp_path / "test").test(other, datamodule=mvtec(mvtec_root), ckpt_path=checkpoint_of(tmp_path))


def test_cli_test_predict_and_export_from_checkpoint(tmp_path, mvtec_root, monkeypatch) -> None:
    run_root = tmp_path / "train"
    run_anomalib(
        "fit", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1", "--data", "anomalib.data.MVTecAD",
        "--data.root", mvtec_root, "--data.category", "bottle", *SMALL_DATA_CLI, "--trainer.accelerator", "cpu",
        "--default_root_dir", run_root,
    )  # fmt: skip
    checkpoint = checkpoint_of(run_root)
    model_args = ["--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1"]

    tested = run_anomalib(
        "test", *model_args, "--data", "anomalib.data.MVTecAD", "--data.root", mvtec_root, "--data.category", "bottle",
        *SMALL_DATA_CLI, "--ckpt_path", checkpoint, "--default_root_dir", tmp_path / "test",
    )  # fmt: skip
    assert re.search(r"image_AUROC\s*│\s*\d\.\d+", tested)

    predicted_root = tmp_path / "predict"
    predicted = run_anomalib(
        "predict", *model_args, "--data", mvtec_root / "bottle" / "test" / "broken", "--ckpt_path", checkpoint,
        "--default_root_dir", predicted_root,
    )  # fmt: skip
    assert "prompts use" not in predicted  # the checkpoint's text features are used, none are made for 'object'
    written = sorted(p.name for p in predicted_root.rglob("*.png"))
    assert written == sorted(p.name for p in (mvtec_root / "bottle" / "test" / "broken").glob("*.png"))

    loaded = Mvfa.load_from_checkpoint(checkpoint).eval()
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = loaded(images)
    for export_type in ("torch", "onnx"):
        run_anomalib(
            "export", *model_args, "--export_type", export_type, "--ckpt_path", checkpoint,
            "--export_root", tmp_path / "export",
        )  # fmt: skip
    onnx_path = tmp_path / "export" / "weights" / "onnx" / "model.onnx"
    session = onnxruntime.InferenceSession(str(onnx_path))
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {"input": images.numpy()}), strict=True)
    )
    assert np.abs(outputs["pred_score"] - reference.pred_score.numpy()).max() <= EXPORT_TOLERANCE
    assert np.abs(outputs["anomaly_map"] - reference.anomaly_map.numpy()).max() <= EXPORT_TOLERANCE

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's torch export is a pickle: this one we just wrote
    inferencer = TorchInferencer(tmp_path / "export" / "weights" / "torch" / "model.pt", device="cpu")
    exported = inferencer.model(images)
    assert torch.allclose(exported.pred_score, reference.pred_score, atol=EXPORT_TOLERANCE)
    assert torch.allclose(exported.anomaly_map, reference.anomaly_map, atol=EXPORT_TOLERANCE)


@pytest.mark.parametrize("source", ["synthetic", "validation", "folder"])
def test_each_abnormal_source_trains(source, tmp_path, folder_root, caplog) -> None:
    abnormal_source = str(folder_root / "test" / "broken") if source == "folder" else source
    model = Mvfa(**TINY_MODEL, abnormal_source=abnormal_source, epochs=1)
    callbacks = model.configure_callbacks()
    callback = next(c for c in callbacks if isinstance(c, FewShotMemoryBankCallback))
    model.configure_callbacks = lambda: callbacks  # keep a handle on the callback the trainer uses
    before = adapter_weights(model)
    caplog.set_level(logging.INFO, logger="anomalib_mvfa")
    engine(tmp_path).fit(model, datamodule=folder_datamodule(folder_root))
    assert not torch.equal(before, adapter_weights(model))
    abnormal = callback.selected_files["abnormal"]
    assert len(abnormal) == 2
    if source == "synthetic":
        assert all(name.startswith("perlin(") for name in abnormal)
    else:
        assert all(Path(name).parent == folder_root / "test" / "broken" for name in abnormal)
    if source == "validation":
        validation = {str(p) for p in folder_datamodule_split(folder_root, "val")}
        assert set(abnormal) <= validation
    # the folder has no masks/ subfolder: its abnormal images train the detection adapters only
    assert ("only the detection loss is trained" in caplog.text) == (source == "folder")


def test_validation_source_refuses_a_validation_split_that_is_the_test_split(tmp_path, mvtec_root) -> None:
    datamodule = mvtec(mvtec_root)  # anomalib's MVTecAD default: val_split_mode same_as_test
    model = Mvfa(**TINY_MODEL, abnormal_source="validation", epochs=1)
    with pytest.raises(ValueError, match=r"from the test split.*val_split_mode from_test"):
        engine(tmp_path).fit(model, datamodule=datamodule)


def folder_datamodule_split(root: Path, split: str) -> list[str]:
    datamodule = folder_datamodule(root)
    datamodule.setup()
    data = datamodule.val_data if split == "val" else datamodule.test_data
    return data.samples.image_path.tolist()


def test_support_selection_is_seeded(folder_root) -> None:
    datamodule = folder_datamodule(folder_root)
    datamodule.setup()

    def selection(seed: int) -> list[str]:
        settings = SupportSettings(k_shot=2, seed=seed, image_size=TINY_MODEL["image_size"])
        normal = draw_normal(settings, datamodule)
        abnormal = draw_abnormal(settings, normal, datamodule)
        return normal.sources + abnormal.sources

    assert selection(0) == selection(0)
    assert selection(0) != selection(1)


def test_saved_adapters_evaluate_without_training(tmp_path, mvtec_root) -> None:
    trained = Mvfa(**TINY_MODEL, epochs=1)
    engine(tmp_path / "train").fit(trained, datamodule=mvtec(mvtec_root))
    adapters = trained.save_adapters(tmp_path / "adapters.pth")

    model = Mvfa(**TINY_MODEL, epochs=0, adapter_checkpoint=str(adapters))
    assert model.learning_type.value == "few_shot"
    results = engine(tmp_path / "eval").train(model, datamodule=mvtec(mvtec_root))
    assert set(results[0]) >= {"image_AUROC", "pixel_AUROC"}
    assert torch.equal(adapter_weights(model), adapter_weights(trained))
    assert model.model.has_memory_bank
