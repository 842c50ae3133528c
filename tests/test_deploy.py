"""Deployment paths: bfloat16 inference, INT8 calibration on normal images, and ``speed --deploy``'s fidelity.

Tolerances on the tiny random backbone (what the docs state, `docs/pages/speed.md`): ONNX Runtime
within 1e-4 of torch float32 (image scores and maps); bfloat16 image encoder within 0.1 of the
fused image score (random weights put many scores near ties, so bfloat16 moves them more than
pretrained weights do); the whole model under bfloat16 autocast (``speed --deploy``'s path, the
normalisation included) within 0.25.
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

EXPORT_TOLERANCE = 1e-4
BFLOAT16_SCORE_TOLERANCE = 0.1
AUTOCAST_SCORE_TOLERANCE = 0.25  # the whole model under autocast, normalisation included


def test_bfloat16_inference_moves_scores_within_the_stated_tolerance(tiny_model: MvfaModel) -> None:
    generator = torch.Generator().manual_seed(0)
    tiny_model.setup(reference_images=torch.rand(4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator))
    images = torch.rand(6, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    tiny_model.eval()
    exact = tiny_model(images)
    tiny_model.inference_precision = "bfloat16"
    try:
        reduced = tiny_model(images)
    finally:
        tiny_model.inference_precision = "float32"
    assert reduced.pred_score.dtype == torch.float32
    difference = (reduced.pred_score - exact.pred_score).abs().max().item()
    assert 0 < difference <= BFLOAT16_SCORE_TOLERANCE  # the encoder did run in bfloat16, and stayed close
    assert torch.corrcoef(torch.stack([reduced.pred_score, exact.pred_score]))[0, 1] > 0.9


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
        "speed", "--deploy", "--backbone", "tiny-random", "--k-shot", "2", "--epochs", "0", "--batch-size", "4",
        "--held-out", "4", "--repeats", "1", "--paths", "onnxruntime,torch bf16 autocast",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0, output
    table = deploy_table(output)
    assert list(table) == ["torch float32", "torch bf16 autocast", "onnxruntime"], output
    columns = ["images/s", "ratio", "memory", "setup", "score", "map", "spearman", "image", "pixel"]
    onnx = dict(zip(columns, table["onnxruntime"], strict=True))
    assert float(onnx["score"]) <= EXPORT_TOLERANCE
    assert float(onnx["map"]) <= EXPORT_TOLERANCE
    assert float(onnx["spearman"]) >= 0.999
    assert float(onnx["image"]) == 0
    assert float(onnx["pixel"]) == pytest.approx(0, abs=0.01)
    bf16 = dict(zip(columns, table["torch bf16 autocast"], strict=True))
    assert 0 < float(bf16["score"]) <= AUTOCAST_SCORE_TOLERANCE
    reference = dict(zip(columns, table["torch float32"], strict=True))
    assert reference["ratio"] == "1.00x"
    assert float(reference["score"]) == 0
    assert np.isfinite(float(bf16["images/s"]))


def test_speed_deploy_refuses_an_unknown_path_by_name(capsys) -> None:
    assert console(["speed", "--deploy", "--backbone", "tiny-random", "--paths", "tensorrt"]) == 2
    assert "--paths names ['tensorrt']: expected some of torch float32," in capsys.readouterr().err
