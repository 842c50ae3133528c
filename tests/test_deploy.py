"""Deployment paths: bfloat16 inference, INT8 calibration on normal images, and ``speed --deploy``'s fidelity.

Tolerances on the tiny CLIP trained here (``tests/fixtures/tiny_clip``; what the docs state,
`docs/pages/speed.md`): ONNX Runtime within 1e-4 of torch float32 (image scores and maps) and a
Spearman of at least 0.999; the bfloat16 image encoder (``inference_precision``) and the whole model
under bfloat16 autocast within 0.02 of the image scores and 0.05 of the maps, Spearman at least 0.99.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder

from anomalib_mvfa import MvfaModel
from anomalib_mvfa.commands import console, main
from anomalib_mvfa.errors import MvfaInputError
from anomalib_mvfa.utils import NormalImagesCalibration, calibrate_on_normal_images

from .conftest import TINY_IMAGE_SIZE, folder_datamodule
from .fixtures.make_tiny_clip import CONFIG_PATH, WEIGHTS_PATH
from .fixtures.tiny_clip_data import HELD_OUT_CLASS, IMAGE_SIZE, held_out_set

EXPORT_TOLERANCE = 1e-4
BFLOAT16_SCORE_TOLERANCE = 0.02
BFLOAT16_MAP_TOLERANCE = 0.05
BFLOAT16_SPEARMAN = 0.99
TINY_CLIP = ["--backbone", str(CONFIG_PATH), "--pretrained", str(WEIGHTS_PATH), "--image-size", str(IMAGE_SIZE),
             "--feature-layers", "1", "2", "3", "4"]  # fmt: skip


def test_bfloat16_inference_moves_scores_within_the_stated_tolerance() -> None:
    model = MvfaModel(CONFIG_PATH, pretrained=WEIGHTS_PATH, image_size=IMAGE_SIZE, feature_layers=(1, 2, 3, 4))
    images, _ = held_out_set(6, seed=3)
    images = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()  # grey, in [0, 1]
    model.setup(HELD_OUT_CLASS, reference_images=images[:4])
    model.eval()
    exact = model(images[4:])
    model.inference_precision = "bfloat16"
    reduced = model(images[4:])
    assert reduced.pred_score.dtype == torch.float32
    score_difference = (reduced.pred_score - exact.pred_score).abs().max().item()
    map_difference = (reduced.anomaly_map - exact.anomaly_map).abs().max().item()
    assert 0 < score_difference <= BFLOAT16_SCORE_TOLERANCE  # the encoder did run in bfloat16, and stayed close
    assert map_difference <= BFLOAT16_MAP_TOLERANCE


def test_an_unknown_inference_precision_is_refused(tiny_config: Path) -> None:
    with pytest.raises(
        MvfaInputError, match=r"inference_precision must be one of \('float32', 'bfloat16'\), got 'fp8'"
    ):
        MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, inference_precision="fp8")


def test_int8_calibration_sees_only_the_normal_training_images(folder_root: Path) -> None:
    """anomalib calibrates on ``val_dataloader()``: Mvfa's export hands it the training split instead."""
    datamodule: Folder = folder_datamodule(folder_root)
    kwargs = calibrate_on_normal_images({"compression_type": "int8_ptq", "datamodule": datamodule})
    calibration = kwargs["datamodule"]
    assert isinstance(calibration, NormalImagesCalibration)
    calibration.setup("fit")
    calibration.train_batch_size = 3  # anomalib sets a static input's batch through this attribute
    assert datamodule.train_batch_size == 3
    seen = [(path, int(label)) for batch in calibration.val_dataloader() for path, label in
            zip(batch.image_path, batch.gt_label, strict=True)]  # fmt: skip
    train = sorted(str(path) for path in (folder_root / "train" / "good").glob("*.png"))
    assert sorted(path for path, _ in seen) == train  # every training image, nothing else
    assert {label for _, label in seen} == {0}
    untouched = calibrate_on_normal_images({"compression_type": "fp16", "datamodule": datamodule})
    assert untouched["datamodule"] is datamodule


def deploy_table(output: str) -> dict[str, list[str]]:
    """The rows of ``speed --deploy``'s table by path name."""
    rows = [line.strip("|").split("|") for line in output.splitlines() if re.match(r"^\| (torch|onnx|openvino)", line)]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def test_speed_deploy_prints_each_paths_fidelity_against_float32(capsys) -> None:
    code = main([
        "speed", "--deploy", *TINY_CLIP, "--k-shot", "2", "--epochs", "0", "--batch-size", "4",
        "--held-out", "4", "--repeats", "1",
        "--paths",
        "onnxruntime,torch bf16 autocast,torch bf16 encoder,torch bf16 encoder+search,openvino f32,openvino default",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0, output
    table = deploy_table(output)
    bf16_paths = ["torch bf16 encoder", "torch bf16 encoder+search", "torch bf16 autocast"]  # and OpenVINO's default
    assert list(table) == ["torch float32", *bf16_paths, "onnxruntime", "openvino f32", "openvino default"], output
    columns = ["images/s", "ratio", "memory", "setup", "score", "map", "spearman", "image", "pixel"]
    for name in ("onnxruntime", "openvino f32"):  # exact exports
        exact = dict(zip(columns, table[name], strict=True))
        assert float(exact["score"]) <= EXPORT_TOLERANCE, name
        assert float(exact["map"]) <= EXPORT_TOLERANCE, name
        assert float(exact["spearman"]) >= 0.999, name
        assert float(exact["image"]) == 0, name
        assert float(exact["pixel"]) == pytest.approx(0, abs=0.01), name
    for name in [*bf16_paths, "openvino default"]:  # the encoder's: a checkpoint reloaded with inference_precision
        bf16 = dict(zip(columns, table[name], strict=True))
        assert 0 < float(bf16["score"]) <= BFLOAT16_SCORE_TOLERANCE, name
        assert float(bf16["map"]) <= BFLOAT16_MAP_TOLERANCE, name
        assert float(bf16["spearman"]) >= BFLOAT16_SPEARMAN, name
    reference = dict(zip(columns, table["torch float32"], strict=True))
    assert reference["ratio"] == "1.00x"
    assert float(reference["score"]) == 0
    assert np.isfinite(float(bf16["images/s"]))


def test_speed_deploy_refuses_an_unknown_path_by_name(capsys) -> None:
    assert console(["speed", "--deploy", "--backbone", "tiny-random", "--paths", "tensorrt"]) == 2
    assert "--paths names ['tensorrt']: expected some of torch float32," in capsys.readouterr().err
