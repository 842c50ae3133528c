"""Small helpers shared by the package."""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from .errors import MvfaInputError
from .tensor_files import check_tensor_archive

logger = logging.getLogger(__name__)

# First characters that make a spreadsheet read a CSV cell as a formula (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def write_atomically(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``: it appears whole or not at all.

    Example:
        >>> import torch
        >>> write_atomically("out/adapters.pth", lambda name: torch.save({}, name))  # doctest: +SKIP
        PosixPath('out/adapters.pth')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(temporary)
        with Path(temporary).open("rb+") as file:  # on disk before the rename: a power loss leaves no empty file
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # a plain write's permissions (mkstemp makes 0600)
        Path(temporary).replace(path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def csv_cell(value: object) -> object:
    """``value`` safe in a spreadsheet: text that would start a formula gets a leading single quote.

    Text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (OWASP's CSV-injection
    list) is prefixed with ``'`` unless it is a number; every other value is returned as it is.

    Example:
        >>> csv_cell("=HYPERLINK(1).png"), csv_cell("-0.5"), csv_cell(-0.5), csv_cell("scan.png")
        ("'=HYPERLINK(1).png", '-0.5', -0.5, 'scan.png')
    """
    if not isinstance(value, str) or not value.startswith(_FORMULA_STARTS):
        return value
    try:
        float(value)
    except ValueError:
        return "'" + value
    return value


def write_rows(path: str | Path, rows: Sequence[dict[str, object]]) -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV file, whole or not at all; cells pass :func:`csv_cell`."""
    if not rows:
        msg = f"No rows to write to '{path}'."
        raise MvfaInputError(msg)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[csv_cell(name) for name in rows[0]])
    writer.writeheader()
    writer.writerows({csv_cell(key): csv_cell(value) for key, value in row.items()} for row in rows)
    write_atomically(Path(path), lambda name: Path(name).write_text(buffer.getvalue()))
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint writer, but a checkpoint appears whole or not at all (full disk, kill).

    Local checkpoints are written to a temporary file beside the target, synced and renamed;
    other paths (``s3://`` and the like) are written as anomalib writes them. Loading is anomalib's
    (``weights_only`` with the model's safe globals) after the archive's entries are checked, as for
    every torch file the package reads; anomalib's Engine still recognises it.

    Example:
        >>> trainer.strategy.checkpoint_io = AtomicCheckpointIO()  # doctest: +SKIP
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        save = super().save_checkpoint
        if "://" in str(path):
            save(checkpoint, path, storage_options)
            return
        write_atomically(path, lambda temporary: save(checkpoint, temporary, storage_options))

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool = True) -> dict[str, Any]:
        """Check a local checkpoint's archive (:func:`~anomalib_mvfa.tensor_files.check_tensor_archive`); load it."""
        if "://" not in str(path):
            check_tensor_archive(path, "Checkpoint")  # before torch's reader sees a hostile archive
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def export_atomically(export_root: str | Path, export: Callable[[Path], Path]) -> Path:
    """Run ``export(staging_root)`` in a hidden staging folder, then move its files into ``export_root``.

    ``export`` writes an exported model under the root it is given and returns the path of the
    file that loads it. Every file is moved with an atomic rename, that file last, so an
    interrupted export never leaves a loadable half-written model.

    Example:
        >>> export_atomically("results", lambda root: model.to_torch(root))  # doctest: +SKIP
        PosixPath('results/weights/torch/model.pt')
    """
    root = Path(export_root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=root) as staging:
        staged = Path(export(Path(staging)))
        target = root / staged.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        for file in sorted(staged.parent.iterdir(), key=lambda file: file == staged):
            if file.is_file():
                Path(file).replace(target.parent / file.name)
    return target


# Modules each export needs beyond anomalib-mvfa's own: its ``export`` extra installs them.
EXPORT_MODULES = {"to_onnx": ("onnx", "onnxscript"), "to_openvino": ("onnx", "onnxscript", "openvino")}
# Loggers that report a successful ONNX export's opset fallback as a warning with a long traceback.
EXPORT_NOISE_LOGGERS = ("onnxscript.version_converter",)


def check_export_modules(export: str) -> None:
    """Refuse the export ``export`` (``"to_onnx"``, ...) when a module it needs is missing, naming the extra.

    Example:
        >>> check_export_modules("to_torch")  # needs nothing more

    Raises:
        ModuleNotFoundError: Naming the missing modules and ``anomalib-mvfa[export]``.
    """
    missing = [name for name in EXPORT_MODULES.get(export, ()) if find_spec(name) is None]
    if missing:
        kind = export.removeprefix("to_").replace("onnx", "ONNX").replace("openvino", "OpenVINO")
        msg = (
            f"Mvfa's {kind} export needs {', '.join(missing)}: install anomalib-mvfa's export extra, "
            "pip install 'anomalib-mvfa[export]'."
        )
        raise ModuleNotFoundError(msg, name=missing[0])


class NormalImagesCalibration:
    """A datamodule whose validation loader is another's training loader: its normal images only.

    anomalib's INT8 post-training quantisation (``compression_type=int8_ptq``) calibrates on
    ``datamodule.val_dataloader()``, which for most datamodules holds test images (``val_split_mode``
    ``from_test``). Mvfa's export hands it this wrapper instead, so calibration sees the training
    split (normal images, what the memory bank was built from) and never a test image.

    Example:
        >>> calibration = NormalImagesCalibration(datamodule)  # doctest: +SKIP
        >>> calibration.val_dataloader() is not None  # doctest: +SKIP
        True
    """

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule

    def setup(self, stage: str | None = None) -> None:
        """Set the wrapped datamodule up."""
        self.datamodule.setup(stage)

    @property
    def train_batch_size(self) -> int:
        """The wrapped datamodule's training batch size (anomalib sets it to a static input's batch)."""
        return self.datamodule.train_batch_size

    @train_batch_size.setter
    def train_batch_size(self, value: int) -> None:
        self.datamodule.train_batch_size = value

    def val_dataloader(self) -> Any:
        """The wrapped datamodule's training loader: normal images only."""
        return self.datamodule.train_dataloader()

    def __getattr__(self, name: str) -> Any:
        """Anything else (``task``, ``name``) from the wrapped datamodule."""
        return getattr(self.__dict__["datamodule"], name)


def calibrate_on_normal_images(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``to_openvino``'s keyword arguments with an INT8 PTQ datamodule wrapped in :class:`NormalImagesCalibration`.

    Example:
        >>> calibrate_on_normal_images({"compression_type": None})
        {'compression_type': None}
    """
    compression = kwargs.get("compression_type")
    datamodule = kwargs.get("datamodule")
    if datamodule is None or str(getattr(compression, "value", compression)).lower() != "int8_ptq":
        return kwargs
    if not isinstance(datamodule, NormalImagesCalibration):
        logger.info("INT8 calibration uses the training split of the datamodule (normal images), never test images.")
        datamodule = NormalImagesCalibration(datamodule)
    return {**kwargs, "datamodule": datamodule}


@contextmanager
def quiet_export() -> Iterator[None]:
    """Within the scope, the exporters' notes on a fallback that succeeded are not logged as warnings.

    Errors are still logged; the loggers' levels are restored when the scope ends.

    Example:
        >>> with quiet_export():
        ...     pass
    """
    loggers = [logging.getLogger(name) for name in EXPORT_NOISE_LOGGERS]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


class ResumeCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every training epoch, to resume an interrupted fit with ``--ckpt_path``.

    anomalib's own checkpoint (``model.ckpt``) is written only after the last epoch's validation.

    Example:
        >>> ResumeCheckpoint().state_key
        'MvfaResumeCheckpoint'
    """

    def __init__(self) -> None:
        super().__init__(filename="last", enable_version_counter=False, save_on_train_epoch_end=True)

    @property
    def state_key(self) -> str:
        """Distinct from anomalib's checkpoint callback in the checkpoint's callback states."""
        return "MvfaResumeCheckpoint"
