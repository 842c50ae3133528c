"""Weights files from users: TorchScript code never runs, declared sizes are checked before allocation."""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch

from anomalib_mvfa.backbone import PretrainedWeightsError, load_clip
from anomalib_mvfa.commands import console
from anomalib_mvfa.tensor_files import load_tensors_safely, read_torchscript_tensors

from .conftest import TINY_CONFIG, TINY_IMAGE_SIZE


class TouchesAFile(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` creates the file ``marker`` while the archive loads."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        touched = torch.from_file(self.marker, True, 1)  # creates the file
        self.weight = state[1] + 0 * touched.sum()
        self.training = state[2]


def archive_that_runs_code(folder: Path) -> tuple[Path, Path]:
    marker = folder / "marker"
    archive = folder / "ViT-B-16.pt"
    torch.jit.save(torch.jit.script(TouchesAFile(str(marker))), str(archive))
    torch.jit.load(str(archive))  # what loading it with torch does: the code runs
    assert marker.exists(), "the archive does not run code when torch.jit.load reads it"
    marker.unlink()
    return archive, marker


def test_torchscript_weights_never_run_their_code_in_python(tmp_path) -> None:
    archive, marker = archive_that_runs_code(tmp_path)
    with pytest.raises(PretrainedWeightsError, match=r"ViT-B-16\.pt"):
        load_clip("tiny-random", archive, TINY_IMAGE_SIZE)
    assert not marker.exists()


def test_torchscript_weights_never_run_their_code_from_the_command_line(tmp_path, capsys) -> None:
    archive, marker = archive_that_runs_code(tmp_path)
    code = console([
        "demo", "--backbone", "tiny-random", "--pretrained", str(archive),
        "--root", str(tmp_path / "data"), "--results", str(tmp_path / "results"), "--epochs", "1",
    ])  # fmt: skip
    assert code == 2
    assert "ViT-B-16.pt" in capsys.readouterr().err
    assert not marker.exists()


def test_torchscript_reader_gives_the_archive_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CONFIG).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "clip.pt"))
    read = read_torchscript_tensors(tmp_path / "clip.pt", "Weights file")
    expected = model.state_dict()
    assert set(expected) <= set(read)
    assert all(torch.equal(read[key], value) for key, value in expected.items())


def deflated_copy(source: Path, target: Path) -> Path:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in original.infolist():
            copy.writestr(info.filename, original.read(info))
    return target


def test_compressed_weights_are_refused_before_inflating(tmp_path) -> None:
    torch.save({"visual.proj": torch.zeros(4 * 2**20)}, tmp_path / "plain.pt")  # 16 MiB of zeros
    bomb = deflated_copy(tmp_path / "plain.pt", tmp_path / "bomb.pt")
    assert bomb.stat().st_size < 2**20 / 10  # it inflates more than a hundredfold
    with pytest.raises(PretrainedWeightsError, match=r"bomb\.pt' was refused: \d+ of its \d+ entries are compressed"):
        load_clip("tiny-random", bomb, TINY_IMAGE_SIZE)


class _Storage:
    """Pickled as a persistent id that declares ``numel`` float32 values under key ``"0"``."""

    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    def __init__(self, storage: _Storage) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple:
        size = (self.storage.numel,)
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, size, (1,), False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> tuple | None:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def torch_file(path: Path, declared_numel: int, held_bytes: int) -> Path:
    """A file in torch.save's layout whose one tensor declares ``declared_numel`` values."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump({"visual.proj": _Tensor(_Storage(declared_numel))})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("weights/data.pkl", buffer.getvalue())
        archive.writestr("weights/data/0", bytes(held_bytes))
        archive.writestr("weights/version", "3\n")
    return path


def test_a_file_is_readable_when_it_holds_what_it_declares(tmp_path) -> None:
    path = torch_file(tmp_path / "honest.pt", declared_numel=4, held_bytes=16)  # the crafting is right
    assert torch.equal(load_tensors_safely(path, "Weights file")["visual.proj"], torch.zeros(4))


def test_weights_declaring_more_than_they_hold_are_refused(tmp_path) -> None:
    path = torch_file(tmp_path / "liar.pt", declared_numel=2**32, held_bytes=16)  # asks for 16 GiB
    with pytest.raises(PretrainedWeightsError, match=r"declares 17179869184 bytes for tensor storage '0' but holds 16"):
        load_clip("tiny-random", path, TINY_IMAGE_SIZE)


def test_weights_larger_than_the_backbone_are_refused_before_loading(tmp_path) -> None:
    numel = 10 * 2**20  # 40 MiB, really held; the tiny backbone's budget is below 30 MiB
    path = torch_file(tmp_path / "huge.pt", declared_numel=numel, held_bytes=4 * numel)
    with pytest.raises(PretrainedWeightsError, match=r"declare 40\.0 MiB, more than the 2\d\.\d MiB"):
        load_clip("tiny-random", path, TINY_IMAGE_SIZE)
