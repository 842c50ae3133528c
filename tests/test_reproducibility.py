"""Same seed, same result; an interrupted fit resumed from its last checkpoint ends where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer

from anomalib_mvfa import Mvfa

from .conftest import cpu_engine
from .test_lightning import TINY_MODEL, mvtec


class _InterruptedError(RuntimeError):
    pass


class _InterruptAtEpoch(Callback):
    """Stops the fit when ``epoch`` (0-based) starts, as a power cut would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        del pl_module
        if trainer.current_epoch == self.epoch:
            raise _InterruptedError


def _adapters(model: Mvfa) -> dict[str, torch.Tensor]:
    state = model.model.adapter_state_dict()
    return {f"{branch}.{key}": value for branch in state for key, value in state[branch].items()}


def _predictions(engine: Engine, model: Mvfa, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batches = engine.predict(model, datamodule=mvtec(root))
    return torch.cat([b.pred_score for b in batches]), torch.cat([b.anomaly_map for b in batches])


def test_same_seed_gives_bitwise_identical_adapters_and_scores(tmp_path, mvtec_root) -> None:
    runs = []
    for name in ("first", "second"):
        model = Mvfa(**TINY_MODEL, epochs=2, seed=3)
        engine = cpu_engine(tmp_path / name)
        engine.fit(model, datamodule=mvtec(mvtec_root))
        runs.append((_adapters(model), *_predictions(engine, model, mvtec_root)))
    (adapters_a, scores_a, maps_a), (adapters_b, scores_b, maps_b) = runs
    assert all(torch.equal(adapters_a[key], adapters_b[key]) for key in adapters_a)
    assert torch.equal(scores_a, scores_b)
    assert torch.equal(maps_a, maps_b)
    # another seed gives other adapters: the comparison can fail
    other = Mvfa(**TINY_MODEL, epochs=2, seed=4)
    cpu_engine(tmp_path / "other").fit(other, datamodule=mvtec(mvtec_root))
    assert any(not torch.equal(adapters_a[key], value) for key, value in _adapters(other).items())


def test_resumed_fit_ends_with_the_adapters_of_an_uninterrupted_fit(tmp_path, mvtec_root) -> None:
    uninterrupted = Mvfa(**TINY_MODEL, epochs=4)
    cpu_engine(tmp_path / "uninterrupted").fit(uninterrupted, datamodule=mvtec(mvtec_root))

    interrupted = Mvfa(**TINY_MODEL, epochs=4)
    with pytest.raises(_InterruptedError):
        cpu_engine(tmp_path / "interrupted", [_InterruptAtEpoch(2)]).fit(interrupted, datamodule=mvtec(mvtec_root))
    (last,) = (tmp_path / "interrupted").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # written after epochs 1 and 2
    assert not list((tmp_path / "interrupted").rglob("model.ckpt"))  # the run did not finish

    resumed = Mvfa(**TINY_MODEL, epochs=4)
    cpu_engine(tmp_path / "resumed").fit(resumed, datamodule=mvtec(mvtec_root), ckpt_path=last)
    expected, found = _adapters(uninterrupted), _adapters(resumed)
    assert all(torch.equal(expected[key], found[key]) for key in expected)
    halfway = _adapters(interrupted)
    assert any(not torch.equal(expected[key], halfway[key]) for key in expected)  # two epochs were missing


def test_export_appears_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    model = Mvfa(**TINY_MODEL, epochs=0)
    path = model.to_torch(tmp_path / "export")
    assert path == tmp_path / "export" / "weights" / "torch" / "model.pt"
    assert path.is_file()
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["weights"]  # no staging folder left

    def save_half_then_fail(obj: object, f: str | Path, **kwargs: object) -> None:
        del obj, kwargs
        Path(f).write_bytes(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        model.to_torch(tmp_path / "interrupted")
    assert not [p for p in (tmp_path / "interrupted").rglob("*") if p.is_file()]
