"""Reading tensor files from users without running their code or trusting their sizes.

Weights and adapter files come from anywhere, so they are read in two steps:

1. **Inspect** the archive without building anything: every entry is checked before one is read
   (names compared as torch's reader and Python's ``zipfile`` compare them, so that both read the
   same entries; entries stored uncompressed except TorchScript's code, which no reader here reads,
   as a compressed entry is how a small file inflates into gigabytes; declared sizes within the
   file's), and its pickle is walked by a restricted unpickler that builds no object and
   allocates no tensor, only collecting the storages it declares. Each declared storage must fit
   in the bytes its entry really holds, and all of them together in the caller's budget (the
   size of the chosen backbone): refused before anything is allocated.
2. **Read**: files written by ``torch.save`` with ``torch.load(weights_only=True)``; TorchScript
   archives (the format of OpenAI's CLIP releases) by this module's own reader, which takes the
   tensors out of the archive and never executes the archive's code (``torch.jit.load`` would:
   a TorchScript ``__setstate__`` runs while the file loads).

Example:
    >>> from anomalib_mvfa.tensor_files import load_tensors_safely, read_torchscript_tensors
    >>> state = load_tensors_safely("Brain.pth", "Adapter checkpoint")  # doctest: +SKIP
    >>> weights = read_torchscript_tensors("ViT-L-14-336px.pt", "Weights file")  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import io
import operator
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MvfaFileNotFoundError, MvfaInputError

# Bytes per element of the storage classes a torch pickle names.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Harmless globals a torch pickle may name, and what stands in for each (they build plain values).
_REBUILD_TENSOR = "rebuild tensor"  # resolved by the unpickler: a stub, or a view into a read storage
_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("torch", "Size"): tuple,
    ("torch", "device"): lambda *args: args,
    ("torch.serialization", "_get_layout"): lambda *args: args,
    ("torch._utils", "_rebuild_tensor"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD_TENSOR,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_args: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_args: data,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "build_strlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, *_args: value,
}


# General-purpose flag bit 11 of a zip entry: its name is UTF-8 (else code page 437).
_UTF8_NAME_FLAG = 0x800
# Most an entry may declare to inflate to, per stored byte (torch's compressed code entries reach 3).
_MAX_INFLATION = 64


class UnsafeTensorFileError(MvfaInputError):
    """Raised for a tensor file that is refused before it is loaded."""


@dataclass
class _Storage:
    """A storage as a pickle declares it (persistent id ``('storage', type, key, location, numel)``)."""

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


@dataclass
class _TensorStub:
    """A tensor as a pickle declares it, before (or instead of) building it."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _BadTensorRecordError(Exception):
    """A tensor record whose view does not fit its storage (turned into an :class:`UnsafeTensorFileError`)."""


class _ScriptObject:
    """Stands for a TorchScript class instance (a module) of an archive: attributes only, no code."""

    state: object = None

    def __setstate__(self, state: object) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only plain values, tensor records and (in archives) TorchScript objects as data.

    ``build=False`` replaces every tensor with a :class:`_TensorStub` and reads no storage;
    ``build=True`` makes the tensors from the archive's entries, after their sizes were checked.
    """

    def __init__(self, data: bytes, archive: _Archive, build: bool, script_objects: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.build = build
        self.script_objects = script_objects
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if self.script_objects and (module == "__torch__" or module.startswith("__torch__.")):
            return _ScriptObject
        if (module, name) not in _PLAIN_GLOBALS:
            msg = f"global '{module}.{name}'"
            raise UnsafeTensorFileError(msg)
        stand_in = _PLAIN_GLOBALS[module, name]
        return self._rebuild_tensor if stand_in == _REBUILD_TENSOR else stand_in

    def persistent_load(self, pid: Any) -> _Storage | torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[4], int)):
            msg = f"persistent id {pid!r:.80}"
            raise UnsafeTensorFileError(msg)
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype) or numel < 0:
            msg = f"storage type {dtype!r:.80}"
            raise UnsafeTensorFileError(msg)
        storage = self.storages.setdefault(str(key), _Storage(str(key), dtype, int(numel)))
        return self.archive.storage_tensor(storage) if self.build else storage

    @staticmethod
    def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_args: object) -> Any:
        offset, size, stride = _tensor_view(storage, offset, size, stride)
        if isinstance(storage, torch.Tensor):  # built: a view into the storage's flat tensor
            return storage.as_strided(size, stride, offset)
        return _TensorStub(storage, offset, size, stride)


def _tensor_view(storage: object, offset: Any, size: Any, stride: Any) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """A tensor record's view, checked to lie within its storage (a hostile one would reach elsewhere).

    Raises:
        _BadTensorRecordError: Unless offset, sizes and strides are non-negative integers, as many
            sizes as strides, and the view's last element within the storage.
    """
    numel = (
        storage.numel if isinstance(storage, _Storage) else storage.numel() if isinstance(storage, torch.Tensor) else 0
    )
    record = f"offset {offset!r:.40}, size {size!r:.80}, stride {stride!r:.80}"
    try:
        offset, size, stride = (
            operator.index(offset),
            tuple(map(operator.index, size)),
            tuple(map(operator.index, stride)),
        )
    except TypeError as error:
        raise _BadTensorRecordError(record) from error
    if offset < 0 or len(size) != len(stride) or min((*size, *stride, 0)) < 0:
        raise _BadTensorRecordError(record)
    if 0 not in size and offset + sum((length - 1) * step for length, step in zip(size, stride, strict=True)) >= numel:
        msg = f"{record} reaches beyond the {numel} element(s) of its storage"
        raise _BadTensorRecordError(msg)
    return offset, size, stride


@dataclass
class _Archive:
    """A zip-format torch file (``torch.save`` or TorchScript) and the checks of its entries.

    Entries are looked up as torch's reader does (:func:`_torch_name`), whichever reader reads them.
    """

    path: Path
    what: str
    zip_file: zipfile.ZipFile
    prefix: bytes
    entries: dict[bytes, zipfile.ZipInfo] = field(default_factory=dict)
    built: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, what: str) -> _Archive:
        if not zipfile.is_zipfile(path):
            msg = (
                f"{what} '{path}' is not a file written by torch.save (not a zip archive: cut short, say, or saved "
                f"by torch older than 1.6, which is not read: load and save it again with a current torch)."
            )
            raise MvfaInputError(msg)
        try:
            archive = zipfile.ZipFile(path)
            infos = archive.infolist()
        except (zipfile.BadZipFile, UnicodeDecodeError, ValueError, OSError, EOFError) as error:
            msg = f"{what} '{path}' is not a readable zip archive ({type(error).__name__}: {error})."
            raise MvfaInputError(msg) from error
        try:
            return cls._checked(path, what, archive, infos)
        except Exception:
            archive.close()
            raise

    @classmethod
    def _checked(cls, path: Path, what: str, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> _Archive:
        entries = _check_entries(path, what, infos)
        first = _raw_name(infos[0]) if infos else b""
        prefix = first.split(b"/", 1)[0] + b"/" if b"/" in first else b""  # torch's reader: the first entry's folder
        if _torch_name(prefix + b"data.pkl") not in entries:
            msg = f"{what} '{path}' is not a file written by torch.save (no data.pkl in the archive)."
            raise MvfaInputError(msg)
        opened = cls(path, what, archive, prefix, entries)
        byteorder = entries.get(_torch_name(prefix + b"byteorder"))
        if byteorder is not None and opened.read(byteorder, limit=16).strip() not in {b"little", b""}:
            msg = f"{what} '{path}' stores big-endian tensors, which this reader does not convert."
            raise MvfaInputError(msg)
        return opened

    def entry(self, name: str) -> zipfile.ZipInfo | None:
        """The entry ``prefix + name``, found as torch's reader finds it."""
        return self.entries.get(_torch_name(self.prefix + name.encode()))

    def read(self, info: zipfile.ZipInfo, limit: int = -1) -> bytes:
        """The bytes of ``info`` (at most ``limit``); a damaged entry is an :class:`MvfaInputError`."""
        try:
            with self.zip_file.open(info) as file:
                return file.read(limit)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            msg = f"{self.what} '{self.path}' has a damaged entry '{info.filename}' ({type(error).__name__}: {error})."
            raise MvfaInputError(msg) from error

    def unpickle(self, build: bool, script_objects: bool) -> tuple[Any, dict[str, _Storage]]:
        pickled = self.read(self.entries[_torch_name(self.prefix + b"data.pkl")])
        unpickler = _RestrictedUnpickler(pickled, self, build=build, script_objects=script_objects)
        try:
            content = unpickler.load()
        except UnsafeTensorFileError as error:
            msg = (
                f"{self.what} '{self.path}' was refused: it holds Python objects other than tensors and plain "
                f"containers ({error}), which could run code when loaded (only tensors and plain containers are "
                f"read, then torch.load(weights_only=True))."
            )
            raise UnsafeTensorFileError(msg) from error
        except _BadTensorRecordError as error:
            msg = f"{self.what} '{self.path}' was refused: it holds a tensor record that is not valid ({error})."
            raise UnsafeTensorFileError(msg) from error
        except (
            pickle.UnpicklingError,
            EOFError,
            AttributeError,
            IndexError,
            TypeError,
            KeyError,
            ValueError,
            RuntimeError,
        ) as error:
            msg = f"{self.what} '{self.path}' is not a file written by torch.save ({type(error).__name__}: {error})."
            raise MvfaInputError(msg) from error
        return content, unpickler.storages

    def check_storages(self, storages: dict[str, _Storage], max_bytes: int | None) -> None:
        """Every declared storage within its entry's real size, all within ``max_bytes``."""
        for storage in storages.values():
            entry = self.entry(f"data/{storage.key}")
            held = -1 if entry is None else entry.file_size
            if held < storage.nbytes:
                msg = (
                    f"{self.what} '{self.path}' was refused: it declares {storage.nbytes} bytes for tensor "
                    f"storage '{storage.key}' but holds {max(held, 0)}."
                )
                raise UnsafeTensorFileError(msg)
        total = sum(storage.nbytes for storage in storages.values())
        if max_bytes is not None and total > max_bytes:
            msg = (
                f"{self.what} '{self.path}' was refused before loading: its tensors declare {total / 2**20:.1f} MiB, "
                f"more than the {max_bytes / 2**20:.1f} MiB the chosen model can use."
            )
            raise UnsafeTensorFileError(msg)

    def storage_tensor(self, storage: _Storage) -> torch.Tensor:
        """The storage's bytes as a flat tensor of its type (read once per storage)."""
        if storage.key not in self.built:
            self.built[storage.key] = self._read_storage(storage)
        return self.built[storage.key]

    def _read_storage(self, storage: _Storage) -> torch.Tensor:
        data = bytearray(self.read(self.entry(f"data/{storage.key}"), limit=storage.nbytes))
        if storage.dtype == torch.bool:
            return torch.frombuffer(data, dtype=torch.uint8).to(torch.bool) if data else torch.empty(0, dtype=bool)
        return torch.frombuffer(data, dtype=storage.dtype) if data else torch.empty(0, dtype=storage.dtype)


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    """The entry's name as stored: the bytes torch's reader compares (Python's ``zipfile`` decodes them)."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & _UTF8_NAME_FLAG else "cp437")


def _torch_name(raw: bytes) -> bytes:
    """A stored name as torch's reader (miniz) matches it: ASCII letters in any case, whole (a NUL included)."""
    return raw.lower().replace(b"\\", b"/")


def _check_entries(path: Path, what: str, infos: list[zipfile.ZipInfo]) -> dict[bytes, zipfile.ZipInfo]:
    """Refuse names that readers tell apart differently, compressed entries and sizes beyond the file's.

    Returns:
        The entries by :func:`_torch_name`.

    Raises:
        UnsafeTensorFileError: Naming the file and the first entry found wrong.
    """
    refused = f"{what} '{path}' was refused"
    cut = [info.orig_filename for info in infos if "\x00" in info.orig_filename]
    if cut:
        msg = (
            f"{refused}: its entry name {cut[0]!r} holds a NUL byte, where Python's zipfile ends the name and "
            "torch's reader does not: the two would read different entries."
        )
        raise UnsafeTensorFileError(msg)
    entries: dict[bytes, zipfile.ZipInfo] = {}
    python_names: set[str] = set()
    for info in infos:
        key = _torch_name(_raw_name(info))
        if key in entries or info.filename in python_names:
            other = entries.get(key, info)
            msg = (
                f"{refused}: it holds two entries named alike ({other.orig_filename!r} and {info.orig_filename!r}; "
                "torch's reader ignores letter case), so readers may take different ones."
            )
            raise UnsafeTensorFileError(msg)
        entries[key] = info
        python_names.add(info.filename)
    first = _raw_name(infos[0]) if infos else b""
    code = _torch_name(first.split(b"/", 1)[0] + b"/code/")  # TorchScript's code: compressed, read by no reader
    compressed = [
        i for i in infos if i.compress_type != zipfile.ZIP_STORED and not _torch_name(_raw_name(i)).startswith(code)
    ]
    if compressed:
        msg = (
            f"{refused}: {len(compressed)} of its {len(infos)} entries are compressed (for example "
            f"'{compressed[0].filename}'), which torch never does for the entries it reads; a compressed entry can "
            "inflate far beyond the file's size."
        )
        raise UnsafeTensorFileError(msg)
    size = path.stat().st_size
    stored = sum(info.compress_size for info in infos)
    uneven = [
        info
        for info in infos
        if info.file_size > _MAX_INFLATION * info.compress_size
        or (info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size)
    ]
    if uneven or stored > size:
        detail = (
            f"its entry '{uneven[0].filename}' declares {uneven[0].file_size} bytes stored in {uneven[0].compress_size}"
            if uneven
            else f"its entries declare {stored} bytes in a file of {size}"
        )
        msg = f"{refused} before reading: {detail}, which no honest archive does (a decompression bomb would)."
        raise UnsafeTensorFileError(msg)
    return entries


def check_tensor_archive(path: str | Path, what: str) -> None:
    """Refuse a zip-format torch file (a Lightning checkpoint, say) that torch's reader could be tricked by.

    Checks every entry before anything is read: names that Python's ``zipfile`` and torch's reader
    tell apart differently (a NUL byte, letter case), compressed entries (which inflate beyond the
    file's size) and declared sizes beyond the file's; then that it has the ``data.pkl`` torch reads.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: Naming the file and what is wrong (:class:`UnsafeTensorFileError` for the above).

    Example:
        >>> check_tensor_archive("model.ckpt", "Checkpoint")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{what} '{path}' does not exist."
        raise MvfaFileNotFoundError(msg)
    _Archive.open(path, what).zip_file.close()


def _inspect(path: str | Path, what: str, max_bytes: int | None, script_objects: bool) -> _Archive:
    path = Path(path)
    if not path.is_file():
        msg = f"{what} '{path}' does not exist."
        raise MvfaFileNotFoundError(msg)
    archive = _Archive.open(path, what)
    _, storages = archive.unpickle(build=False, script_objects=script_objects)
    archive.check_storages(storages, max_bytes)
    return archive


def load_tensors_safely(path: str | Path, what: str, max_bytes: int | None = None) -> Any:  # a tensor container
    """Inspect a ``torch.save`` file, then ``torch.load(path, weights_only=True)`` it.

    Args:
        path: The file.
        what: How messages name it, for example ``"Adapter checkpoint"``.
        max_bytes: Most bytes its tensors may declare (``None``: only the file's own size bounds them).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a zip-format file written by ``torch.save``, holds objects that
            unpickling would run or build, or declares more tensor data than it holds or than
            ``max_bytes`` (:class:`UnsafeTensorFileError`, a ``ValueError``).

    Example:
        >>> state = load_tensors_safely("Brain.pth", "Adapter checkpoint")  # doctest: +SKIP
    """
    archive = _inspect(path, what, max_bytes, script_objects=False)
    try:
        return torch.load(archive.path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        msg = f"{what} '{archive.path}' was refused by torch.load(weights_only=True): {error}"
        raise UnsafeTensorFileError(msg) from error
    except (RuntimeError, EOFError, IndexError, OSError) as error:
        msg = f"{what} '{archive.path}' is not a file written by torch.save ({type(error).__name__}: {error})."
        raise MvfaInputError(msg) from error


def read_torchscript_tensors(path: str | Path, what: str, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive by attribute path (``"visual.conv1.weight"``), without running it.

    The archive's code is never executed; its objects are read as plain attributes.

    Raises:
        ValueError: As :func:`load_tensors_safely`.

    Example:
        >>> weights = read_torchscript_tensors("ViT-B-16.pt", "Weights file")  # doctest: +SKIP
        >>> weights["visual.conv1.weight"].shape  # doctest: +SKIP
        torch.Size([768, 3, 16, 16])
    """
    archive = _inspect(path, what, max_bytes, script_objects=True)
    content, _ = archive.unpickle(build=True, script_objects=True)
    tensors: dict[str, torch.Tensor] = {}
    _collect(content, "", tensors, depth=0)
    return tensors


def _collect(value: object, prefix: str, tensors: dict[str, torch.Tensor], depth: int) -> None:
    """Tensors under ``value`` by dotted attribute path (module attributes and state dictionaries)."""
    if depth > sys.getrecursionlimit() // 4:
        return
    if isinstance(value, torch.Tensor):
        tensors[prefix.removesuffix(".")] = value
    elif isinstance(value, _ScriptObject):
        _collect(value.state, prefix, tensors, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _collect(item, f"{prefix}{key}.", tensors, depth + 1)
