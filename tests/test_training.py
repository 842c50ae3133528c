"""How Mvfa trains inside Lightning: warnings left as they were, support records in checkpoints."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning.pytorch import Callback

from anomalib_mvfa import Mvfa

from .conftest import TINY_IMAGE_SIZE, cpu_engine, folder_datamodule, write_dataset
from .test_fixtures_v0_2 import FIXTURES

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}


class FailWhenTrainingStarts(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        msg = "stop before the first step"
        raise RuntimeError(msg)


def test_a_fit_leaves_the_warning_filters_as_they_were(tmp_path) -> None:
    datamodule = folder_datamodule(write_dataset(tmp_path / "data", "folder"))
    before = list(warnings.filters)
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    cpu_engine(tmp_path / "run").fit(model, datamodule=datamodule)
    assert warnings.filters == before
    # a fit that fails between its start and the first step (the filter's whole life) leaves them too
    with pytest.raises(RuntimeError, match="stop before the first step"):
        cpu_engine(tmp_path / "failed", [FailWhenTrainingStarts()]).fit(
            Mvfa(**TINY, k_shot=2, epochs=1), datamodule=datamodule
        )
    assert warnings.filters == before


def test_a_fit_resumed_from_a_0_2_checkpoint_restores_its_support_record(tmp_path, recwarn) -> None:
    """The checkpoint's callback state ``FewShotMemoryBankCallback`` comes back into the model's support set."""
    checkpoint = torch.load(FIXTURES / "model.ckpt", weights_only=True)
    recorded = checkpoint["callbacks"]["FewShotMemoryBankCallback"]["selected_files"]
    model = Mvfa(**TINY, k_shot=2, epochs=2)
    datamodule = folder_datamodule(write_dataset(tmp_path / "data", "folder"))
    cpu_engine(tmp_path / "run").fit(model, datamodule=datamodule, ckpt_path=FIXTURES / "model.ckpt")
    assert model.support.selected_files == recorded  # restored after this fit drew its own
    assert not [w for w in recwarn if "add the following callbacks" in str(w.message)]
