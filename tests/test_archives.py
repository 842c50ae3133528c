"""Hostile zip archives: every entry checked as torch's reader and Python's ``zipfile`` see it, before any read.

Each resource case runs in a subprocess whose address space is limited to 1.5 GiB above its
baseline: a file that made either reader inflate gigabytes fails there with a ``MemoryError``
instead of a one-line error naming the file.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from anomalib.engine import Engine

from anomalib_mvfa import Mvfa
from anomalib_mvfa.commands.evaluate import _load_checkpoint
from anomalib_mvfa.tensor_files import (
    UnsafeTensorFileError,
    check_tensor_archive,
    load_tensors_safely,
    read_torchscript_tensors,
)
from anomalib_mvfa.utils import AtomicCheckpointIO

from .conftest import TINY_CONFIG
from .test_lightning import TINY_MODEL

INFLATED_BYTES = 1792 * 2**20  # one allocation of 1.75 GiB: above the 1.5 GiB the subprocess may add
MEMORY_LIMIT = 3 * 2**29  # 1.5 GiB above the subprocess's baseline


def pickled_tensor(numel: int, offset: int = 0, size: tuple = (), stride: tuple = (), name: str = "weight") -> bytes:
    """A torch pickle of ``{name: tensor}`` over storage ``"0"`` of ``numel`` float32 values."""

    class Storage:
        pass

    class Tensor:
        def __reduce__(self) -> tuple:
            view = (offset, size or (numel,), stride or (1,), False, collections.OrderedDict())
            return (torch._utils._rebuild_tensor_v2, (storage, *view))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    storage = Storage()
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({name: Tensor()})
    return buffer.getvalue()


def _write_bomb(archive: zipfile.ZipFile, name: str) -> None:
    """A deflated entry of ``INFLATED_BYTES`` zeros (about 2 MB in the file)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    chunk = bytes(2**20)
    with archive.open(info, "w") as entry:
        for _ in range(INFLATED_BYTES // len(chunk)):
            entry.write(chunk)


def archive_file(
    path: Path,
    entries: list[tuple[str, bytes | None]],
    renames: dict[str, bytes] | None = None,
    deflated: tuple[str, ...] = (),
) -> Path:
    """A zip archive of ``entries`` (``None``: a decompression bomb), stored unless a bomb or ``deflated``, in order.

    ``renames`` then replaces each placeholder name by raw bytes of the same length (a NUL byte,
    which Python's ``zipfile`` cannot write).
    """
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, compresslevel=1) as archive:  # a bomb: fastest level
        for name, data in entries:
            if data is None:
                _write_bomb(archive, name)
            else:
                archive.writestr(name, data, zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED)
    content = path.read_bytes()
    for placeholder, raw in (renames or {}).items():
        assert len(placeholder.encode()) == len(raw)
        content = content.replace(placeholder.encode(), raw)
    path.write_bytes(content)
    return path


def honest_entries(numel: int = 1) -> list[tuple[str, bytes | None]]:
    return [
        ("w/data.pkl", pickled_tensor(numel)),
        ("w/byteorder", b"little"),
        ("w/data/0", bytes(4 * numel)),
        ("w/version", b"3\n"),
    ]


def refusal_within_memory_limit(call: str) -> str:
    """What ``call`` prints in a subprocess limited to 1.5 GiB above its baseline: its one-line error."""
    script = "\n".join([
        "import resource",
        "from anomalib_mvfa.errors import MvfaInputError",
        "from anomalib_mvfa.tensor_files import load_tensors_safely, read_torchscript_tensors",
        "with open('/proc/self/status') as status:",
        "    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmSize'))",
        f"resource.setrlimit(resource.RLIMIT_AS, (size + {MEMORY_LIMIT}, size + {MEMORY_LIMIT}))",
        "try:",
        f"    {call}",
        "except MvfaInputError as error:",
        "    print(type(error).__name__ + ': ' + str(error))",
        "else:",
        "    print('NO ERROR')",
    ])  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


def test_the_crafted_archives_are_read_whenhonest_entries(tmp_path: Path) -> None:
    path = archive_file(tmp_path / "honest.pt", honest_entries(4))
    assert torch.equal(load_tensors_safely(path, "Weights file")["weight"], torch.zeros(4))


def test_a_second_entry_named_alike_after_a_nul_byte_is_refused(tmp_path: Path) -> None:
    # Python's zipfile ends the decoy's name at the NUL and checks it (stored, 4 bytes);
    # torch's reader compares whole names and reads the compressed entry instead.
    entries = [*honest_entries()[:2], ("w/data/0", None), ("w/data/0Zx", bytes(4)), honest_entries()[3]]
    path = archive_file(tmp_path / "nul.pt", entries, renames={"w/data/0Zx": b"w/data/0\x00x"})
    line = refusal_within_memory_limit(f"load_tensors_safely({str(path)!r}, 'Weights file')")
    assert line == (
        f"UnsafeTensorFileError: Weights file '{path}' was refused: its entry name 'w/data/0\\x00x' holds a NUL "
        "byte, where Python's zipfile ends the name and torch's reader does not: the two would read different "
        "entries."
    )


def test_entries_named_alike_in_another_letter_case_are_refused(tmp_path: Path) -> None:
    entries = [*honest_entries()[:2], ("w/DATA/0", None), ("w/data/0", bytes(4)), honest_entries()[3]]
    path = archive_file(tmp_path / "case.pt", entries)
    line = refusal_within_memory_limit(f"load_tensors_safely({str(path)!r}, 'Adapter checkpoint')")
    assert line == (
        f"UnsafeTensorFileError: Adapter checkpoint '{path}' was refused: it holds two entries named alike "
        "('w/DATA/0' and 'w/data/0'; torch's reader ignores letter case), so readers may take different ones."
    )


def test_a_compressed_byteorder_entry_is_refused_before_it_inflates(tmp_path: Path) -> None:
    entries = [honest_entries()[0], ("w/byteorder", None), *honest_entries()[2:]]
    path = archive_file(tmp_path / "byteorder.pt", entries)
    line = refusal_within_memory_limit(f"read_torchscript_tensors({str(path)!r}, 'Weights file')")
    assert line == (
        f"UnsafeTensorFileError: Weights file '{path}' was refused: 1 of its 4 entries are compressed (for example "
        "'w/byteorder'), which torch never does for the entries it reads; a compressed entry can inflate far "
        "beyond the file's size."
    )


def test_entries_declaring_more_than_the_file_holds_are_refused(tmp_path: Path) -> None:
    path = archive_file(tmp_path / "overlap.pt", honest_entries(4))
    content = bytearray(path.read_bytes())
    # the central directory's sizes of 'w/data/0' (16 bytes) raised to 2**30, both fields alike
    record = content.index(b"w/data/0", content.index(b"PK\x01\x02")) - 46  # name after 46 bytes of header
    content[record + 20 : record + 28] = (2**30).to_bytes(4, "little") * 2
    path.write_bytes(bytes(content))
    with pytest.raises(UnsafeTensorFileError) as caught:
        load_tensors_safely(path, "Weights file")
    declared = 2**30 + len(b"little") + len(b"3\n") + len(pickled_tensor(4))
    assert str(caught.value) == (
        f"Weights file '{path}' was refused before reading: its entries declare {declared} "
        f"bytes in a file of {path.stat().st_size}, which no honest archive does (a decompression bomb would)."
    )


@pytest.mark.parametrize(
    ("view", "detail"),
    [
        ({"offset": 2, "size": (4,), "stride": (1,)}, r"offset 2, size \(4,\), stride \(1,\) reaches beyond the 4"),
        ({"size": (2, 2), "stride": (-1, 1)}, r"size \(2, 2\), stride \(-1, 1\)\)"),
        ({"size": (2,), "stride": (1, 1)}, r"size \(2,\), stride \(1, 1\)\)"),
    ],
)
def test_tensor_records_reaching_outside_their_storage_are_refused(tmp_path: Path, view: dict, detail: str) -> None:
    path = archive_file(
        tmp_path / "view.pt", [("w/data.pkl", pickled_tensor(4, **view)), ("w/data/0", bytes(16)), honest_entries()[3]]
    )
    pattern = rf"Weights file '.*view\.pt' was refused: it holds a tensor record that is not valid \(.*{detail}"
    with pytest.raises(UnsafeTensorFileError, match=pattern):
        read_torchscript_tensors(path, "Weights file")  # the TorchScript reader builds the views itself
    with pytest.raises(UnsafeTensorFileError, match=pattern):
        load_tensors_safely(path, "Weights file")


def test_a_zero_stride_view_of_one_value_is_never_expanded(tmp_path: Path) -> None:
    """A 2^17 x 2^17 view of one stored value (64 GiB if expanded) under a real key: refused by its shape."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CONFIG))
    tensor = pickled_tensor(1, size=(2**17, 2**17), stride=(0, 0), name="visual.conv1.weight")
    path = archive_file(tmp_path / "stride0.pt", [("w/data.pkl", tensor), ("w/data/0", bytes(4)), honest_entries()[3]])
    line = refusal_within_memory_limit(
        f"__import__('anomalib_mvfa.backbone').backbone.load_clip({str(config)!r}, {str(path)!r}, 64)"
    )
    assert line.startswith(f"PretrainedWeightsError: Weights '{path}' do not fit backbone 'tiny': "), line
    assert "visual.conv1.weight: file (131072, 131072), model (48, 3, 16, 16)" in line


def test_torchscript_code_entries_may_stay_compressed(tmp_path: Path) -> None:
    module = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(module, str(tmp_path / "linear.pt"))
    with zipfile.ZipFile(tmp_path / "linear.pt") as archive:
        assert any(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())  # torch compresses code
    tensors = read_torchscript_tensors(tmp_path / "linear.pt", "Weights file")
    assert torch.equal(tensors["weight"], module.weight)


def test_lightning_checkpoints_are_checked_before_torch_reads_them(tmp_path: Path) -> None:
    entries = [*honest_entries()[:2], ("w/data/0", None), ("w/data/0Zx", bytes(4)), honest_entries()[3]]
    path = archive_file(tmp_path / "model.ckpt", entries, renames={"w/data/0Zx": b"w/data/0\x00x"})
    with pytest.raises(UnsafeTensorFileError, match=r"Checkpoint '.*model\.ckpt' was refused: its entry name"):
        check_tensor_archive(path, "Checkpoint")
    with pytest.raises(UnsafeTensorFileError, match=r"Checkpoint '.*model\.ckpt' was refused: its entry name"):
        _load_checkpoint(argparse.Namespace(ckpt_path=str(path), feature_pipeline=None))


def test_a_lightning_checkpoint_is_checked_before_lightning_reads_it(tmp_path: Path) -> None:
    """``anomalib test|predict --ckpt_path``: Lightning loads through the run's checkpoint IO, which checks first."""
    honest = tmp_path / "honest.ckpt"
    torch.save({"state_dict": {"weight": torch.arange(3.0)}}, honest)
    loaded = AtomicCheckpointIO().load_checkpoint(honest)
    assert torch.equal(loaded["state_dict"]["weight"], torch.arange(3.0))
    decoy = archive_file(tmp_path / "nul.ckpt", honest_entries(), renames={"w/data/0": b"w/data\x000"})
    with pytest.raises(UnsafeTensorFileError, match=r"Checkpoint '.*nul\.ckpt' was refused: .*NUL"):
        AtomicCheckpointIO().load_checkpoint(decoy)


def test_mvfa_load_from_checkpoint_and_export_check_the_archive_first(tmp_path: Path) -> None:
    """``Mvfa.load_from_checkpoint`` and ``anomalib export --ckpt_path`` (which calls it) refuse a hostile archive."""
    decoy = archive_file(tmp_path / "nul.ckpt", honest_entries(), renames={"w/data/0": b"w/data\x000"})
    with pytest.raises(UnsafeTensorFileError, match=r"Checkpoint '.*nul\.ckpt' was refused: .*NUL"):
        Mvfa.load_from_checkpoint(decoy)
    with pytest.raises(UnsafeTensorFileError, match=r"Checkpoint '.*nul\.ckpt' was refused: .*NUL"):
        Engine(default_root_dir=tmp_path, logger=False).export(
            Mvfa(**TINY_MODEL), "torch", export_root=tmp_path / "export", ckpt_path=decoy
        )
    assert not (tmp_path / "export").exists()
