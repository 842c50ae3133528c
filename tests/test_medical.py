"""The medical benchmark layout: reading, splits, seed files, few-shot and zero-shot runs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from PIL import Image

from anomalib_mvfa import FewShotMemoryBankCallback, Mvfa
from anomalib_mvfa.data import MedicalAD, ScanReader, parse_seed_file, read_image

from .test_lightning import CONFIGS, TINY_CLI, run_anomalib

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": 64, "feature_layers": (1, 2, 4)}


def medical(root, category: str, **kwargs) -> MedicalAD:
    return MedicalAD(root=root, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)


def engine(root) -> Engine:
    return Engine(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def test_images_are_read_as_they_come(tmp_path) -> None:
    values = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    image = ScanReader(intensity="range").read_image(tmp_path / "grey16.png")
    assert image.shape == (3, 2, 2)
    assert torch.allclose(image[1], torch.from_numpy(values.astype(np.float32) / 65535.0))
    Image.fromarray(np.full((2, 2, 4), 255, np.uint8)).save(tmp_path / "rgba.PNG")
    assert torch.equal(read_image(tmp_path / "rgba.PNG"), torch.ones(3, 2, 2))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken\.png.*cannot be decoded"):
        read_image(tmp_path / "broken.png")


def test_splits_masks_and_tasks(medical_root) -> None:
    brain = medical(medical_root, "Brain")
    brain.setup()
    assert set(brain.train_data.samples.split) == {"valid"}
    assert set(brain.val_data.samples.image_path) == set(brain.train_data.samples.image_path)
    assert set(brain.test_data.samples.split) == {"test"}
    assert len(brain.test_data) == 12
    assert brain.test_data.task.value == "segmentation"
    abnormal = brain.test_data.samples.index[brain.test_data.samples.label_index == 1][0]
    item = brain.test_data[int(abnormal)]
    assert item.image.shape == (3, 48, 48)
    assert item.gt_mask.sum() == 144  # the 12 x 12 square

    chest = medical(medical_root, "Chest")
    chest.setup()
    assert chest.test_data.task.value == "classification"
    assert chest.test_data[0].gt_mask is None
    with pytest.raises(ValueError, match=r"Lung_AD.*Categories under.*Brain"):
        medical(medical_root, "Lung").setup()


def test_seed_file_selects_exactly_the_named_files(medical_root, tmp_path) -> None:
    seed_file = tmp_path / "4-shot.txt"
    seed_file.write_text("a-3: valid_Ungood_1.JPEG valid_Ungood_4.png\nn-3: valid_good_0.png valid_good_5.JPEG\n")
    assert parse_seed_file(seed_file) == {
        3: {
            "abnormal": ["valid_Ungood_1.JPEG", "valid_Ungood_4.png"],
            "normal": ["valid_good_0.png", "valid_good_5.JPEG"],
        }
    }
    model = Mvfa(**TINY, k_shot=2, seed=3, epochs=1)
    callbacks = model.configure_callbacks()
    model.configure_callbacks = lambda: callbacks
    engine(tmp_path / "run").fit(model, datamodule=medical(medical_root, "Brain", seed_file=seed_file))
    (memory_bank_callback,) = [c for c in callbacks if isinstance(c, FewShotMemoryBankCallback)]
    selected = memory_bank_callback.selected_files
    assert [name.rsplit("/", 1)[1] for name in selected["normal"]] == ["valid_good_0.png", "valid_good_5.JPEG"]
    assert [name.rsplit("/", 1)[1] for name in selected["abnormal"]] == ["valid_Ungood_1.JPEG", "valid_Ungood_4.png"]

    seed_file.write_text("a-0: valid_Ungood_1.JPEG missing.png\nn-0: valid_good_0.png valid_good_2.png\n")
    with pytest.raises(ValueError, match=r"no abnormal image named \['missing\.png'\]"):
        engine(tmp_path / "bad").fit(
            Mvfa(**TINY, k_shot=2, epochs=1), datamodule=medical(medical_root, "Brain", seed_file=seed_file)
        )
    seed_file.write_text("a-0 valid_Ungood_1.JPEG\n")
    with pytest.raises(ValueError, match=r"line 1: expected"):
        parse_seed_file(seed_file)


@pytest.mark.parametrize(("category", "pixel_metrics"), [("Brain", True), ("Chest", False)])
def test_few_shot_run_reports_the_right_metrics(medical_root, tmp_path, category, pixel_metrics) -> None:
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    results = engine(tmp_path).train(model, datamodule=medical(medical_root, category))[0]
    assert {"image_AUROC", "image_F1Score"} <= set(results)
    assert ("pixel_AUROC" in results) == pixel_metrics
    assert model.resolve_class_name() == {"Brain": "Brain", "Chest": "Chest X-ray film"}[category]


def test_zero_shot_leave_one_out_run(medical_root, tmp_path, caplog) -> None:
    caplog.set_level("INFO", logger="anomalib_mvfa")
    model = Mvfa(**TINY, k_shot=0, epochs=1)
    assert model.seg_learning_rate == pytest.approx(1e-4)
    before = torch.cat([p.detach().flatten().clone() for p in model.model.det_adapters.parameters()])
    datamodule = medical(medical_root, "Liver", train_categories=["others"], class_names={"Chest": "chest radiograph"})
    results = engine(tmp_path).train(model, datamodule=datamodule)[0]
    after = torch.cat([p.detach().flatten() for p in model.model.det_adapters.parameters()])
    assert not torch.equal(before, after)
    assert not model.model.has_memory_bank  # zero-shot: text branch only
    assert {"image_AUROC", "pixel_AUROC"} <= set(results)
    assert "zero-shot training on 24 labelled images of ['Brain', 'Chest']" in caplog.text
    # a prompt class per category
    assert model.support.selected_files["zero_shot_training"] == [datamodule.prompt_name("Brain"), "chest radiograph"]
    assert model.resolve_class_name() == "Liver"


@pytest.mark.parametrize(
    ("config", "k_shot"), [("mvfa_medical_few_shot.yaml", "2"), ("mvfa_medical_zero_shot.yaml", "0")]
)
def test_shipped_medical_configs_run_from_the_cli(medical_root, tmp_path, config, k_shot) -> None:
    output = run_anomalib(
        "train", "--config", CONFIGS / config, *TINY_CLI, "--model.epochs", "1", "--model.k_shot", k_shot,
        "--data.root", medical_root, "--data.category", "Liver", "--data.num_workers", "0",
        "--default_root_dir", tmp_path,
    )  # fmt: skip
    assert "Mvfa epoch 1/1: loss" in output
    assert re.search(r"image_AUROC\s*│\s*\d\.\d+", output)
    assert re.search(r"pixel_AUROC\s*│\s*\d\.\d+", output)
