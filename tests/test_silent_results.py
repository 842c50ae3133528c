"""Results that would look plausible and be wrong: each is reported for what it is."""

from __future__ import annotations

import errno
import io
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from lightning.fabric.plugins.io import torch_io
from PIL import Image
from safetensors.torch import save_file

from anomalib_mvfa import Mvfa
from anomalib_mvfa.commands import main
from anomalib_mvfa.data import MedicalAD
from anomalib_mvfa.data import read_mask as read_mask_file
from anomalib_mvfa.metrics import DefinedAUROC

from .conftest import TINY_CONFIG, TINY_IMAGE_SIZE, save_checkpoint_file, write_medical_category

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}
TINY_CLI = [
    "--backbone",
    "tiny-random",
    "--pretrained",
    "none",
    "--image-size",
    "64",
    "--feature-layers",
    "1",
    "2",
    "4",
]


def _pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC as the share of (abnormal, normal) pairs ranked right, ties counting half."""
    positive, negative = scores[labels == 1], scores[labels == 0]
    difference = positive[:, None] - negative[None, :]
    return ((difference > 0).float() + 0.5 * (difference == 0).float()).mean().item()


def _image_batch(scores: torch.Tensor, labels: torch.Tensor) -> ImageBatch:
    return ImageBatch(image=torch.zeros(len(scores), 3, 4, 4), pred_score=scores, gt_label=labels)


def test_auroc_over_one_class_is_nan_with_its_reason(caplog) -> None:
    scores = torch.tensor([0.1, 0.7, 0.4, 0.9, 0.3])
    metric = DefinedAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    metric.update(_image_batch(scores, torch.tensor([0, 1, 0, 1, 1])))
    assert metric.compute().item() == pytest.approx(_pairwise_auroc(scores, torch.tensor([0, 1, 0, 1, 1])), abs=1e-6)

    one_class = DefinedAUROC(fields=["pred_score", "gt_label"], prefix="image_")
    one_class.update(_image_batch(scores, torch.zeros(5, dtype=torch.long)))
    with caplog.at_level(logging.WARNING):
        value = one_class.compute()
    assert math.isnan(value.item())
    assert "image_AUROC is undefined: all 5 targets are normal" in caplog.text


@pytest.fixture
def all_normal_test_split(tmp_path) -> Path:
    """A Chest category whose test split holds normal images only."""
    write_medical_category(tmp_path / "MVFA", "Chest", masks=False)
    shutil.rmtree(tmp_path / "MVFA" / "Chest_AD" / "test" / "Ungood")
    return tmp_path / "MVFA"


def test_engine_reports_undefined_image_auroc_as_nan(all_normal_test_split, tmp_path, caplog) -> None:
    model = Mvfa(**TINY, k_shot=2, epochs=0)
    datamodule = MedicalAD(root=all_normal_test_split, category="Chest", num_workers=0, eval_batch_size=4)
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=datamodule)
    with caplog.at_level(logging.WARNING):
        results = engine.test(model, datamodule=datamodule, verbose=False)[0]
    assert math.isnan(results["image_AUROC"])  # anomalib's own AUROC says 0.0 here
    assert "image_AUROC is undefined: all 6 targets are normal" in caplog.text


def test_evaluate_leaves_undefined_cells_empty_with_a_footnote(all_normal_test_split, tmp_path) -> None:
    code = main([
        "evaluate", "--root", str(all_normal_test_split), "--categories", "Chest", "--k-shot", "2",
        "--epochs", "0", *TINY_CLI, "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert code == 0
    table = (tmp_path / "out" / "latest" / "few-shot_2shot.md").read_text()
    chest = next(line for line in table.splitlines() if line.startswith("| Chest"))
    assert [cell.strip() for cell in chest.split("|")[2:6]] == ["", "-", "", "-"]  # AC undefined, AS not applicable
    assert "Chest seed 0: AC (image AUROC) is undefined: all 6 targets are normal" in table
    assert "0.00" not in chest


# --------------------------------------------------------------------------- masks


def _expected(annotation: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((annotation > 0).astype(np.uint8))


@pytest.mark.parametrize("channel", [0, 1, 2])
def test_an_annotation_in_any_colour_channel_is_read(tmp_path, channel) -> None:
    annotation = np.zeros((8, 10), np.uint8)
    annotation[2:5, 3:7] = 255
    rgb = np.zeros((8, 10, 3), np.uint8)
    rgb[..., channel] = annotation
    Image.fromarray(rgb).save(tmp_path / "mask.png")
    assert torch.equal(read_mask_file(tmp_path / "mask.png"), _expected(annotation))


def test_an_alpha_only_annotation_is_read_and_an_opaque_alpha_is_not(tmp_path) -> None:
    annotation = np.zeros((8, 10), np.uint8)
    annotation[1:4, 2:9] = 200
    alpha_only = np.zeros((8, 10, 4), np.uint8)
    alpha_only[..., 3] = annotation
    Image.fromarray(alpha_only, mode="RGBA").save(tmp_path / "alpha.png")
    assert torch.equal(read_mask_file(tmp_path / "alpha.png"), _expected(annotation))
    red_on_opaque = np.zeros((8, 10, 4), np.uint8)
    red_on_opaque[..., 0] = annotation
    red_on_opaque[..., 3] = 255  # an opaque alpha marks nothing
    Image.fromarray(red_on_opaque, mode="RGBA").save(tmp_path / "opaque.png")
    assert torch.equal(read_mask_file(tmp_path / "opaque.png"), _expected(annotation))
    blank = np.zeros((8, 10, 4), np.uint8)
    blank[..., 3] = 255
    Image.fromarray(blank, mode="RGBA").save(tmp_path / "blank.png")
    assert not read_mask_file(tmp_path / "blank.png").any()


def test_a_label_map_counts_every_non_zero_label_with_a_warning(tmp_path, caplog) -> None:
    labels = np.zeros((8, 10), np.uint8)
    labels[1:3, 1:3] = 1
    labels[5:7, 4:9] = 2
    Image.fromarray(labels).save(tmp_path / "labels.png")
    with caplog.at_level(logging.WARNING):
        mask = read_mask_file(tmp_path / "labels.png")
    assert torch.equal(mask, _expected(labels))
    assert "labels.png' is a label map with labels [1, 2] besides 0" in caplog.text
    palette = Image.fromarray(labels, mode="L").convert("P")  # indices 0, 1, 2 as an annotation tool saves them
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    assert torch.equal(read_mask_file(tmp_path / "palette.png"), _expected(labels))


# ------------------------------------------------------------------------- layout


def test_label_folders_in_any_letter_case_are_read_and_counted(tmp_path, caplog) -> None:
    write_medical_category(tmp_path / "MVFA", "Brain", masks=True)
    test = tmp_path / "MVFA" / "Brain_AD" / "test"
    (test / "Ungood").rename(test / "ungood")
    (test / "ungood" / "img").rename(test / "ungood" / "IMG")
    (test / "good").rename(test / "Good")
    with caplog.at_level(logging.INFO):
        datamodule = MedicalAD(root=tmp_path / "MVFA", category="Brain", num_workers=0)
        datamodule.setup()
    labels = datamodule.test_data.samples.label_index
    assert (labels == 1).sum() == 6
    assert (labels == 0).sum() == 6
    assert (datamodule.test_data.samples.mask_path != "").sum() == 6
    assert "MedicalAD Brain/test: 6 normal and 6 abnormal images (6 with masks)" in caplog.text


# ------------------------------------------------------------------ checkpoints


def test_a_checkpoint_loads_with_the_same_clip_weights_in_another_file_format(tmp_path) -> None:
    torch.manual_seed(1)
    state = open_clip.CLIP(**TINY_CONFIG).state_dict()
    torch.save(state, tmp_path / "clip.pt")
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "clip.safetensors"))
    tiny = {**TINY, "backbone": "tiny-random"}
    model = Mvfa(**{**tiny, "pretrained": str(tmp_path / "clip.pt")}, epochs=0, k_shot=0, class_name="scan")
    path = save_checkpoint_file(model, tmp_path / "model.ckpt")
    loaded = Mvfa.load_from_checkpoint(path, pretrained=str(tmp_path / "clip.safetensors"))
    assert loaded.hparams["pretrained"].endswith("clip.safetensors")


def test_a_diverging_fit_stops_and_writes_no_model(tmp_path) -> None:
    write_medical_category(tmp_path / "MVFA", "Brain", masks=True)
    model = Mvfa(**TINY, k_shot=1, epochs=2, seg_learning_rate=1e12, det_learning_rate=1e12)
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False)
    datamodule = MedicalAD(root=tmp_path / "MVFA", category="Brain", num_workers=0, eval_batch_size=4)
    with pytest.raises(
        FloatingPointError, match=r"Mvfa training diverged: the mean loss of epoch \d+ is NaN or infinite"
    ):
        engine.fit(model, datamodule=datamodule)
    assert "train_dataloader" not in vars(datamodule)  # the support set was served for the fit only
    assert not list((tmp_path / "results").rglob("*.ckpt"))
    assert not list((tmp_path / "results").rglob("mvfa_adapters.pth"))


def test_a_checkpoint_that_cannot_be_written_whole_is_not_written(tmp_path, monkeypatch) -> None:
    def half_then_full_disk(checkpoint: dict, path: str) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(path, "wb") as file:
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch_io, "_atomic_save", half_then_full_disk)  # Lightning's own writer
    write_medical_category(tmp_path / "MVFA", "Brain", masks=True)
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False)
    datamodule = MedicalAD(root=tmp_path / "MVFA", category="Brain", num_workers=0, eval_batch_size=4)
    with pytest.raises(OSError, match="No space left"):
        engine.fit(model, datamodule=datamodule)
    assert not [path.name for path in (tmp_path / "results").rglob("*") if ".ckpt" in path.name]


# --------------------------------------------------------------- visualisations


def test_visualisations_of_same_named_images_in_two_label_folders_both_stay(tmp_path) -> None:
    write_medical_category(tmp_path / "MVFA", "Chest", masks=False)
    test = tmp_path / "MVFA" / "Chest_AD" / "test"
    for good, bad in zip(
        sorted((test / "good" / "img").iterdir()), sorted((test / "Ungood" / "img").iterdir()), strict=True
    ):
        bad.rename(bad.with_name(good.name))  # the same file names under good/ and Ungood/
    model = Mvfa(**TINY, k_shot=2, epochs=0)
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False)
    datamodule = MedicalAD(root=tmp_path / "MVFA", category="Chest", num_workers=0, eval_batch_size=4)
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule, verbose=False)
    written = sorted((tmp_path / "results").rglob("images/**/*.*"))
    assert len([path for path in written if path.is_file()]) == 12
    assert any("Ungood" in str(path) for path in written)


def test_barebones_engine_writes_no_checkpoint(tmp_path) -> None:
    write_medical_category(tmp_path / "MVFA", "Brain", masks=True)
    model = Mvfa(**TINY, k_shot=1, epochs=1)
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False, barebones=True)
    engine.fit(model, datamodule=MedicalAD(root=tmp_path / "MVFA", category="Brain", num_workers=0))
    assert not list((tmp_path / "results").rglob("*.ckpt"))
