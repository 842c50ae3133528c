"""The private attributes of other libraries that ``anomalib_mvfa._compat`` relies on still exist.

Each test below fails when an installed library drops (or renames) an internal the package uses,
before any user meets the failure in a run.
"""

from __future__ import annotations

import pytest
from anomalib.data import Folder
from lightning.pytorch import LightningModule, Trainer

from anomalib_mvfa._compat import InternalMissingError, redirect_loop_data, set_default_root_dir


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
