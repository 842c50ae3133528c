"""A checkpoint carries its model's settings: test, predict and export need only ``--ckpt_path``."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from anomalib.data import ImageBatch, InferenceBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor
from torch import nn

from anomalib_mvfa import Mvfa, utils
from anomalib_mvfa.checkpoints import adopt_checkpoint_settings
from anomalib_mvfa.data import VolumeMapWriter
from anomalib_mvfa.errors import MvfaInputError
from anomalib_mvfa.training import epoch_summary

from .test_lightning import SMALL_DATA_CLI, TINY_CLI, checkpoint_of, run_anomalib
from .test_scan_folders import write_dicom_folder, write_nifti_folder

DEFAULTS = {"backbone": "ViT-L-14-336", "pretrained": "openai", "feature_layers": (6, 12, 18, 24), "epochs": 50}
STORED = {"hyper_parameters": {"backbone": "tiny.json", "pretrained": None, "feature_layers": [1, 2, 4], "epochs": 2}}


def test_settings_left_at_their_defaults_take_the_checkpoints() -> None:
    settings = {**DEFAULTS, "epochs": 5}
    changed = adopt_checkpoint_settings(settings, DEFAULTS, STORED)
    assert sorted(changed) == ["backbone", "feature_layers", "pretrained"]
    assert settings == {"backbone": "tiny.json", "pretrained": None, "feature_layers": [1, 2, 4], "epochs": 5}


def test_an_explicit_setting_the_checkpoint_contradicts_is_refused_naming_both() -> None:
    settings = {**DEFAULTS, "backbone": "ViT-B-16"}
    with pytest.raises(MvfaInputError, match=r"backbone: checkpoint tiny.json, model ViT-B-16"):
        adopt_checkpoint_settings(settings, DEFAULTS, STORED)


def test_an_unbuilt_model_saves_and_loads_the_torch_models_keys(tiny_config, tmp_path) -> None:
    model = Mvfa(backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4))
    state = model.state_dict()  # the torch model is built on first use: here
    assert any(key.startswith("model.seg_adapters.") for key in state)
    other = Mvfa(backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), seed=1)
    other.load_state_dict(state)
    assert torch.equal(other.model.seg_adapters[0].fc1[0].weight, model.model.seg_adapters[0].fc1[0].weight)


def test_test_predict_and_export_need_only_the_checkpoint(tmp_path, mvtec_root) -> None:
    run_anomalib(
        "train", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1", "--data", "anomalib.data.MVTecAD",
        "--data.root", mvtec_root, "--data.category", "bottle", *SMALL_DATA_CLI, "--trainer.accelerator", "cpu",
        "--default_root_dir", tmp_path / "train",
    )  # fmt: skip
    checkpoint = checkpoint_of(tmp_path / "train")
    model_args = ["--model", "anomalib_mvfa.Mvfa", "--ckpt_path", checkpoint]  # no other model argument

    tested = run_anomalib(
        "test", *model_args, "--data", "anomalib.data.MVTecAD", "--data.root", mvtec_root, "--data.category", "bottle",
        *SMALL_DATA_CLI, "--default_root_dir", tmp_path / "test",
    )  # fmt: skip
    assert re.search(r"image_AUROC\s*│\s*\d\.\d+", tested)
    assert "backbone='tiny-random'" in tested  # the checkpoint's settings are said to be taken
    predicted_root = tmp_path / "predict"
    for _ in range(2):  # each prediction in a version folder of its own, latest a link to the newest
        run_anomalib(
            "predict", *model_args, "--data", mvtec_root / "bottle" / "test" / "broken",
            "--default_root_dir", predicted_root,
        )  # fmt: skip
    latest = predicted_root / "Mvfa" / "latest"
    assert latest.is_symlink()
    assert latest.resolve().name == "v1"
    for run in ("v0", "v1"):
        assert (predicted_root / "Mvfa" / run / "predictions.csv").is_file()
        assert sorted(p.name for p in (predicted_root / "Mvfa" / run).rglob("*.png"))
    run_anomalib("export", *model_args, "--export_type", "torch", "--export_root", tmp_path / "export")
    assert list((tmp_path / "export").rglob("model.pt"))


class FixedScores(nn.Module):
    """A torch model stand-in that gives each image the score in its first pixel."""

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        scores = images[:, 0, 0, 0]
        maps = images[:, 0]
        return InferenceBatch(pred_score=scores, pred_label=None, anomaly_map=maps, pred_mask=None)


def validation_batch(scores: list[float], labels: list[int], names: list[str]) -> ImageBatch:
    images = torch.tensor(scores).reshape(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()
    return ImageBatch(image=images, gt_label=torch.tensor(labels), image_path=names)


def fitted_threshold(model: Mvfa, batch: ImageBatch) -> float:
    post_processor = PostProcessor()
    post_processor.on_validation_batch_end(None, model, model.validation_step(batch, 0))
    post_processor.on_validation_epoch_end(None, model)
    return float(post_processor.image_threshold)


def test_a_support_image_in_the_validation_split_does_not_move_the_threshold(tiny_config) -> None:
    model = Mvfa(backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=0)
    model.model = FixedScores()
    model.support.selected_files = {"normal": ["train/good/000.png"], "abnormal": ["valid/Ungood/support.png"]}
    held_out = validation_batch([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], [f"valid/{n}.png" for n in "abcd"])
    with_support = validation_batch(
        [0.1, 0.2, 0.8, 0.9, 0.15], [0, 0, 1, 1, 1], [*held_out.image_path, "valid/Ungood/support.png"]
    )
    assert fitted_threshold(model, with_support) == pytest.approx(fitted_threshold(model, held_out))
    only_support = validation_batch([0.15], [1], ["valid/Ungood/support.png"])
    assert model.validation_step(only_support, 0).pred_score.numel() == 0


def test_epochs_are_counted_from_one_in_the_log() -> None:
    trainer = SimpleNamespace(
        current_epoch=2, is_global_zero=True,
        callback_metrics={"train_loss": torch.tensor(0.5), "train_det_loss": torch.tensor(0.25)},
    )  # fmt: skip
    assert epoch_summary(trainer, 3, (1e-3, 1e-3)).startswith("Mvfa epoch 3/3: loss 0.5000")


def test_a_missing_export_module_names_the_extra(tiny_config, tmp_path, monkeypatch) -> None:
    model = Mvfa(backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=0)
    monkeypatch.setattr(utils, "find_spec", lambda name: None if name == "onnxscript" else object())
    with pytest.raises(ModuleNotFoundError, match=r"needs onnxscript: .*pip install 'anomalib-mvfa\[export\]'"):
        model.to_onnx(tmp_path)
    assert not list(tmp_path.rglob("*.onnx"))


def test_a_successful_onnx_export_logs_no_warning(tiny_config, tmp_path, caplog) -> None:
    model = Mvfa(
        backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=0, k_shot=0,
        class_name="bottle",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        path = model.to_onnx(tmp_path)
    assert path.is_file()
    assert not [record for record in caplog.records if record.name.startswith("onnxscript")]
    assert logging.getLogger("onnxscript.version_converter").level == logging.NOTSET  # restored


def test_loading_adapters_is_logged_with_their_layers(tiny_model, tmp_path, caplog) -> None:
    path = tiny_model.save_adapters(tmp_path / "adapters.pth")
    with caplog.at_level(logging.INFO):
        tiny_model.load_adapters(path)
    assert f"Loaded the adapters of '{path}': 3 layer(s) at feature_layers=[1, 2, 4]" in caplog.text


def test_volume_map_writer_counts_scans_and_names_skipped_dicom(tmp_path, caplog) -> None:
    nifti_scan = write_nifti_folder(tmp_path / "nifti") / "abnormal" / "case0.nii.gz"
    dicom_file = write_dicom_folder(tmp_path / "dicom") / "abnormal" / "LES0000.dcm"
    names = [f"{nifti_scan}#axial={z:03d}" for z in range(6)] + [str(dicom_file)]
    outputs = SimpleNamespace(image_path=names, anomaly_map=torch.rand(7, 16, 16), pred_mask=torch.rand(7, 16, 16))
    trainer = SimpleNamespace(datamodule=None, world_size=1, is_global_zero=True, default_root_dir=tmp_path / "run")
    writer = VolumeMapWriter()
    with caplog.at_level(logging.INFO):
        writer.on_predict_batch_end(trainer, None, outputs, None, 0)
        writer.on_predict_epoch_end(trainer, None)
    assert sorted(path.name for path in writer.written) == ["case0_anomaly_map.nii.gz", "case0_pred_mask.nii.gz"]
    assert "Wrote the anomaly maps and predicted masks of 1 scan(s)" in caplog.text
    # the DICOM file has no series UID: no DICOM result can reference it, and the writer says so by name
    assert list(writer.not_written) == [str(dicom_file)]
    assert f"no DICOM results for '{dicom_file}': it has no SeriesInstanceUID" in caplog.text


def test_each_prediction_gets_its_own_run_folder_with_a_table_of_its_images(tiny_config, mvtec_root, tmp_path) -> None:
    images = mvtec_root / "bottle" / "test" / "broken"
    model = Mvfa(
        backbone=str(tiny_config), pretrained=None, image_size=64, feature_layers=(1, 2, 4), epochs=0, k_shot=0,
        class_name="bottle",
    )  # fmt: skip
    for _ in range(2):
        Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False).predict(model, data_path=images)
    latest = tmp_path / "Mvfa" / "latest"
    assert latest.is_symlink()
    assert latest.resolve().name == "v1"
    for run in ("v0", "v1"):
        with (tmp_path / "Mvfa" / run / "predictions.csv").open() as file:
            rows = list(csv.DictReader(file))
        assert sorted(Path(row["file"]).name for row in rows) == sorted(p.name for p in images.glob("*.png"))
        assert all(row["decision"] in {"0", "1"} and float(row["score"]) >= 0 for row in rows)
        assert all(Path(row["map_file"]).is_file() and f"/{run}/" in row["map_file"] for row in rows)


def test_resuming_a_finished_run_says_so_and_writes_nothing(tiny_config, mvtec_root, tmp_path, caplog) -> None:
    settings = {"backbone": str(tiny_config), "pretrained": None, "image_size": 64, "feature_layers": (1, 2, 4)}
    datamodule = MVTecAD(root=mvtec_root, category="bottle", train_batch_size=4, eval_batch_size=4, num_workers=0)
    cpu = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    Engine(default_root_dir=tmp_path, **cpu).fit(Mvfa(**settings, k_shot=2, epochs=1), datamodule=datamodule)
    runs = tmp_path / "Mvfa" / "MVTecAD" / "bottle"
    (last,) = runs.rglob("last.ckpt")
    before = {path: path.stat().st_mtime_ns for path in runs.rglob("*") if path.is_file()}
    with caplog.at_level(logging.WARNING):
        Engine(default_root_dir=tmp_path, **cpu).fit(
            Mvfa(**settings, k_shot=2, epochs=1), datamodule=datamodule, ckpt_path=last
        )
    assert "finished its run (1 of 1 epoch(s) trained): there is nothing to resume" in caplog.text
    assert sorted(path.name for path in runs.iterdir()) == ["latest", "v0"]
    assert (runs / "latest").resolve() == (runs / "v0").resolve()
    assert {path: path.stat().st_mtime_ns for path in runs.rglob("*") if path.is_file()} == before


def test_an_export_from_a_runs_checkpoint_goes_into_that_run(tiny_config, mvtec_root, tmp_path) -> None:
    settings = {"backbone": str(tiny_config), "pretrained": None, "image_size": 64, "feature_layers": (1, 2, 4)}
    datamodule = MVTecAD(root=mvtec_root, category="bottle", train_batch_size=4, eval_batch_size=4, num_workers=0)
    cpu = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    engine = Engine(default_root_dir=tmp_path, **cpu)
    engine.fit(Mvfa(**settings, k_shot=2, epochs=1), datamodule=datamodule)
    (checkpoint,) = tmp_path.rglob("model.ckpt")
    exported = Engine(default_root_dir=tmp_path, **cpu).export(
        Mvfa(**settings), export_type="torch", ckpt_path=checkpoint
    )
    run = tmp_path / "Mvfa" / "MVTecAD" / "bottle" / "v0"
    assert exported == run / "weights" / "torch" / "model.pt"
    assert exported.is_file()
    assert not (tmp_path / "weights").exists()
