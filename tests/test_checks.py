"""Mvfa refuses what it would silently get wrong: 8-bit batches on every path, unusable learning rates."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from anomalib.data import ImageBatch
from anomalib.engine import Engine
from torch.utils.data import DataLoader

from anomalib_mvfa import Mvfa
from anomalib_mvfa.data import MedicalAD
from anomalib_mvfa.errors import MvfaInputError

from .conftest import TINY_IMAGE_SIZE, write_medical_category

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}
EIGHT_BIT = torch.randint(0, 256, (4, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=torch.uint8)


def _scoring_model() -> Mvfa:
    return Mvfa(**TINY, k_shot=0, epochs=0, class_name="scan", visualizer=False)


def image_batches(images: torch.Tensor) -> DataLoader:
    """A loader of anomalib ``ImageBatch`` es made from ``images`` as a user's collate would make them."""
    return DataLoader(list(images), batch_size=2, collate_fn=lambda items: ImageBatch(image=torch.stack(items)))


@pytest.mark.parametrize("stage", ["predict", "test"])
def test_an_eight_bit_image_batch_is_refused_through_the_engine(stage: str, tmp_path: Path) -> None:
    assert ImageBatch(image=EIGHT_BIT).image.max() > 1  # anomalib makes the batch float without scaling it
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    with pytest.raises(MvfaInputError, match=r"images of the batch hold values from \d+ to 255; Mvfa takes images"):
        getattr(engine, stage)(_scoring_model(), dataloaders=image_batches(EIGHT_BIT))


def test_a_batch_in_zero_to_one_is_scored_through_the_engine(tmp_path: Path) -> None:
    images = EIGHT_BIT.float() / 255
    model = _scoring_model()
    engine = Engine(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False)
    predictions = engine.predict(model, dataloaders=image_batches(images))
    scored = torch.cat([batch.anomaly_map for batch in predictions])
    assert torch.allclose(scored, model.score_images(images).anomaly_map, atol=1e-5)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (EIGHT_BIT, r"images has dtype torch.uint8; Mvfa takes float images in \[0, 1\]"),
        (EIGHT_BIT.float(), r"images hold values from \d+ to 255; Mvfa takes images in \[0, 1\]"),
    ],
)
def test_eight_bit_images_are_refused_by_the_direct_path(images: torch.Tensor, message: str) -> None:
    model = _scoring_model()
    with pytest.raises(MvfaInputError, match=message):
        model.score_images(images)
    model.prepare()
    with pytest.raises(MvfaInputError, match=r"images has dtype torch.uint8"):
        model.model.eval()(EIGHT_BIT)  # the torch model refuses integer images itself


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf"), "fast"])
@pytest.mark.parametrize("name", ["seg_learning_rate", "det_learning_rate"])
def test_unusable_learning_rates_are_refused_when_mvfa_is_made(name: str, value: object) -> None:
    with pytest.raises(MvfaInputError, match=rf"{name} must be a finite number >= 0 .*, got {value!r}"):
        Mvfa(**TINY, **{name: value})


def test_a_learning_rate_of_zero_leaves_those_adapters_as_they_are(tmp_path: Path, caplog) -> None:
    write_medical_category(tmp_path / "MVFA", "Brain", masks=True)
    with caplog.at_level(logging.WARNING, logger="anomalib_mvfa.checks"):
        model = Mvfa(**TINY, k_shot=2, epochs=2, seg_learning_rate=0, abnormal_source="train")
    assert "seg_learning_rate=0: the segmentation adapters stay as they are" in caplog.text
    assert (model.seg_learning_rate, model.det_learning_rate) == (0.0, 1e-3)
    before = {
        name: {k: v.clone() for k, v in getattr(model.model, name).state_dict().items()}
        for name in ("seg_adapters", "det_adapters")
    }
    engine = Engine(default_root_dir=tmp_path / "results", accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=MedicalAD(root=tmp_path / "MVFA", category="Brain", num_workers=0, eval_batch_size=4))
    after = {name: getattr(model.model, name).state_dict() for name in before}
    assert all(torch.equal(after["seg_adapters"][k], v) for k, v in before["seg_adapters"].items())
    assert not all(torch.equal(after["det_adapters"][k], v) for k, v in before["det_adapters"].items())
