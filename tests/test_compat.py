"""The private touches of other libraries that remain, each kept in ``anomalib_mvfa/_compat.py``.

Each test fails when the installed library no longer has what the touch relies on, and says so.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from anomalib.data import Folder, PredictDataset
from anomalib.engine import Engine
from anomalib.engine import engine as engine_module
from anomalib.models.image.winclip import torch_model as winclip_torch_model
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch.utils.data import DataLoader

from anomalib_mvfa import _compat
from anomalib_mvfa._compat import (
    InternalMissingError,
    redirect_loop_data,
    set_default_root_dir,
    winclip_without_pretrained_weights,
)
from anomalib_mvfa.data import ScanPredictDataset, ScanReader
from anomalib_mvfa.data.datasets import adopt_prediction_datasets


def test_a_missing_internal_names_the_library_its_version_and_the_tested_range() -> None:
    with pytest.raises(_compat.InternalMissingError) as raised:
        _compat.require_internal(object(), "_data_source", "lightning", "serving the support set")
    message = str(raised.value)
    assert "object._data_source of lightning for serving the support set" in message
    assert f"lightning {_compat.installed_version('lightning')} has none" in message
    assert f"tested with lightning{_compat.TESTED_RANGES['lightning']}" in message


def test_anomalib_prediction_datasets_read_16_bit_images_through_the_package_reader(tmp_path) -> None:
    """``read_predict_dataset_as``: anomalib's PredictDataset still keeps ``image_filenames`` and ``transform``."""
    values = np.linspace(1000, 60000, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(values).save(path)
    dataset = PredictDataset(tmp_path)
    own = dataset[0].image  # anomalib's reader: saturated
    assert adopt_prediction_datasets([DataLoader(dataset)]) == 1
    assert type(dataset) is ScanPredictDataset
    expected = ScanReader().read_image(path)
    low, high = np.percentile(values, (0.5, 99.5))  # the default reader's "auto" stretch of 16-bit images
    stretched = np.clip((values - low) / (high - low), 0, 1)
    assert torch.allclose(expected[0].double(), torch.from_numpy(stretched), atol=1e-6)
    assert torch.equal(dataset[0].image, expected)
    assert not torch.equal(own, expected)


def test_anomalib_predict_builds_its_dataset_through_the_engine_module_global(tmp_path) -> None:
    """``list_prediction_scans_with``: ``Engine.predict`` still calls ``PredictDataset(data_path)`` of its module."""
    assert "PredictDataset(data_path" in inspect.getsource(Engine.predict)
    assert engine_module.PredictDataset.falls_back_to is ScanPredictDataset  # installed by anomalib_mvfa.data
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "image.png")
    assert type(engine_module.PredictDataset(tmp_path)) is PredictDataset  # images: anomalib's own dataset


# ------------------------------------------------------------------------------------------------
# torchmetrics and anomalib models
# ------------------------------------------------------------------------------------------------


class _WeightsAskedError(Exception):
    """Stops WinCLIP's construction once open_clip was asked for weights."""


def test_winclip_still_reads_its_weights_from_the_module_global() -> None:
    assert hasattr(winclip_torch_model, "PRETRAINED")
    assert "PRETRAINED" in inspect.getsource(winclip_torch_model.WinClipModel.__init__)


def test_winclip_asks_open_clip_for_no_weights_within_the_block_only(monkeypatch) -> None:
    asked = []

    def create_model_and_transforms(name: str, pretrained: str | None = None, **kwargs: object) -> None:
        asked.append(pretrained)
        raise _WeightsAskedError

    monkeypatch.setattr(winclip_torch_model.open_clip, "create_model_and_transforms", create_model_and_transforms)
    original = winclip_torch_model.PRETRAINED
    with pytest.raises(_WeightsAskedError), winclip_without_pretrained_weights():
        winclip_torch_model.WinClipModel()
    assert asked == [None]
    assert original == winclip_torch_model.PRETRAINED  # restored, although the block raised
    with pytest.raises(_WeightsAskedError):
        winclip_torch_model.WinClipModel()
    assert asked == [None, original]


def test_winclip_without_its_global_names_anomalib_and_the_tested_range(monkeypatch) -> None:
    monkeypatch.delattr(winclip_torch_model, "PRETRAINED")
    expected = r"PRETRAINED of anomalib .*tested with anomalib>="
    with pytest.raises(InternalMissingError, match=expected), winclip_without_pretrained_weights():
        pass


def _trainer(root) -> Trainer:
    return Trainer(default_root_dir=root, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def _loops(trainer: Trainer) -> dict[str, object]:
    return {
        "train_dataloader": trainer.fit_loop,
        "val_dataloader": trainer.fit_loop.epoch_loop.val_loop,
        "validate": trainer.validate_loop,
        "test_dataloader": trainer.test_loop,
    }


def test_lightning_loops_have_the_data_source_that_mvfa_redirects(tmp_path) -> None:
    """``redirect_loop_data``: every loop Mvfa redirects keeps its data source in ``_data_source.instance``."""
    trainer, model = _trainer(tmp_path), LightningModule()
    datamodule = Folder(name="scans", root=tmp_path, normal_dir="good")
    trainer.fit_loop._data_source.instance = datamodule  # what Trainer.fit(datamodule=...) attaches
    for name, loop in _loops(trainer).items():
        assert hasattr(loop, "_data_source"), name
        assert hasattr(loop._data_source, "instance"), name
        assert hasattr(loop._data_source, "name"), name
    assert redirect_loop_data(trainer.fit_loop, model) == (datamodule, "train_dataloader")
    assert trainer.fit_loop._data_source.instance is model
    assert redirect_loop_data(trainer.fit_loop, model) is None  # already the model's
    assert redirect_loop_data(trainer.test_loop, model) is None  # no source yet
    assert trainer.test_loop._data_source.instance is model
    assert trainer.test_loop._data_source.name == "test_dataloader"


def test_a_lightning_loop_without_a_data_source_is_refused_naming_lightning() -> None:
    with pytest.raises(InternalMissingError, match=r"_data_source of lightning .*tested with lightning>="):
        redirect_loop_data(object(), LightningModule())


def test_lightning_trainer_keeps_its_run_folder_in_default_root_dir(tmp_path) -> None:
    """``set_default_root_dir``: ``Trainer.default_root_dir`` reads the private ``_default_root_dir``."""
    trainer = _trainer(tmp_path / "own")
    assert hasattr(trainer, "_default_root_dir")
    set_default_root_dir(trainer, str(tmp_path / "shared"))
    assert trainer.default_root_dir == str(tmp_path / "shared")
