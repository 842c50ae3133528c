"""The private touches of other libraries in ``anomalib_mvfa._compat``: each fails here when the internal goes."""

from __future__ import annotations

import inspect

import pytest
from anomalib.models.image.winclip import torch_model as winclip_torch_model

from anomalib_mvfa._compat import InternalMissingError, winclip_without_pretrained_weights

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
