"""Adapter files in the authors' layout: round trip and refusals."""

from __future__ import annotations

import pickle

import pytest
import torch

from anomalib_mvfa import MvfaModel

from .conftest import TINY_IMAGE_SIZE


def test_round_trip_in_authors_layout(tiny_model, tiny_config, tmp_path) -> None:
    path = tiny_model.save_adapters(tmp_path / "adapters" / "Brain.pth")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"seg_adapters", "det_adapters", "feature_pipeline"}
    assert checkpoint["feature_pipeline"] == "authors"  # the features they were trained on
    for branch in (checkpoint["seg_adapters"], checkpoint["det_adapters"]):
        assert set(branch) == {f"{i}.fc{j}.0.weight" for i in range(3) for j in (1, 2)}
        assert branch["0.fc1.0.weight"].shape == (32, 48)  # C x W
        assert branch["0.fc2.0.weight"].shape == (48, 32)  # W x C
    assert list(tmp_path.joinpath("adapters").iterdir()) == [path]  # no temporary file left behind

    torch.manual_seed(123)
    other = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4))
    other.load_adapters(path)
    for name in ("seg_adapters", "det_adapters"):
        expected = getattr(tiny_model, name).state_dict()
        for key, value in getattr(other, name).state_dict().items():
            assert torch.equal(value, expected[key])


def test_checkpoint_with_other_layer_count_is_refused(tiny_model, tmp_path, tiny_config) -> None:
    two_layers = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(2, 4))
    path = two_layers.save_adapters(tmp_path / "two.pth")
    with pytest.raises(ValueError, match=r"two\.pth.*2 layer\(s\).*tiny-clip.*expects 3 layer\(s\)"):
        tiny_model.load_adapters(path)


def test_checkpoint_with_other_width_is_refused(tiny_model, tmp_path) -> None:
    wide = {
        name: {f"{i}.fc1.0.weight": torch.zeros(32, 64) for i in range(3)}
        | {f"{i}.fc2.0.weight": torch.zeros(64, 32) for i in range(3)}
        for name in ("seg_adapters", "det_adapters")
    }
    torch.save(wide, tmp_path / "wide.pth")
    before = tiny_model.adapter_state_dict()
    with pytest.raises(ValueError, match=r"\(32, 64\).*\(32, 48\)"):
        tiny_model.load_adapters(tmp_path / "wide.pth")
    after = tiny_model.adapter_state_dict()
    assert all(torch.equal(before[b][k], after[b][k]) for b in before for k in before[b])


def test_not_a_checkpoint_is_refused(tiny_model, tmp_path) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth"):
        tiny_model.load_adapters(tmp_path / "notes.pth")
    torch.save({"adapters": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="seg_adapters"):
        tiny_model.load_adapters(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not exist"):
        tiny_model.load_adapters(tmp_path / "missing.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def test_pickle_that_runs_code_is_refused(tiny_model, tmp_path, capsys) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"seg_adapters": _RunsCode(), "det_adapters": {}}, path)  # torch's own format, code inside
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors .*print.*could run code"):
        tiny_model.load_adapters(path)
    plain = tmp_path / "evil_plain.pth"
    with plain.open("wb") as file:
        pickle.dump({"seg_adapters": _RunsCode(), "det_adapters": {}}, file)
    with pytest.raises(ValueError, match=r"not a file written by torch\.save"):
        tiny_model.load_adapters(plain)
    assert "this pickle ran code" not in capsys.readouterr().out
