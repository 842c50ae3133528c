"""The only place where anomalib-mvfa touches another library's private attributes.

Each touch below exists because the library offers no public way to do the same thing (its
docstring says why). Each is guarded by :func:`require_internal`, which raises a clear error naming
the library, the installed version and the range this package was tested with when the internal
is gone, and by a test in ``tests/test_compat.py`` that fails when the internal disappears.

Nothing outside this module reads or writes a private attribute of torch, Lightning, anomalib,
torchmetrics or open_clip (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

__all__ = ["TESTED_RANGES", "InternalMissingError", "require_internal"]

# The versions each library was tested with (pyproject.toml states the same ranges).
TESTED_RANGES = {
    "anomalib": ">=2.7,<2.8",
    "lightning": ">=2.6,<2.7",
    "torchmetrics": ">=1.8.2,<2",
}


class InternalMissingError(RuntimeError):
    """A private attribute this package relies on is missing from the installed library."""


def installed_version(library: str) -> str:
    """The installed version of ``library`` (its distribution name), or ``"not installed"``.

    Example:
        >>> installed_version("no-such-library-here")
        'not installed'
    """
    try:
        return version(library)
    except PackageNotFoundError:
        return "not installed"


def require_internal(owner: Any, attribute: str, library: str, purpose: str) -> Any:
    """``owner.attribute``, or an :class:`InternalMissingError` naming the library, its version and the tested range.

    Args:
        owner: The object expected to hold the private attribute.
        attribute: The attribute's name.
        library: Distribution name of the library that defines it (a key of :data:`TESTED_RANGES`).
        purpose: What anomalib-mvfa needs it for, said in the error.

    Example:
        >>> class Loop:
        ...     _data_source = "source"
        >>> require_internal(Loop(), "_data_source", "lightning", "serving the support set")
        'source'
    """
    if not hasattr(owner, attribute):
        msg = (
            f"anomalib-mvfa needs {type(owner).__name__}.{attribute} of {library} for {purpose}, and {library} "
            f"{installed_version(library)} has none. anomalib-mvfa was tested with {library}"
            f"{TESTED_RANGES.get(library, '')}: install a version in that range."
        )
        raise InternalMissingError(msg)
    return getattr(owner, attribute)


# ------------------------------------------------------------------------------------------------
# Lightning (owned by lightning_model.py, distributed.py, run_files.py)
# ------------------------------------------------------------------------------------------------


def redirect_loop_data(loop: Any, model: Any) -> tuple[Any, str] | None:
    """Make one of Lightning's loops ask ``model``'s dataloader hook for its data; the source it had before.

    ``Mvfa`` serves its own training set (the augmented support set, not the datamodule's
    training split) and, under DDP, evaluation loaders without repeated images, without
    modifying the user's datamodule. No public way exists: ``Trainer.fit/validate/test(datamodule=...)``
    make the datamodule the source of every loop, a ``LightningModule``'s ``train_dataloader``,
    ``val_dataloader`` and ``test_dataloader`` hooks are called only when neither a datamodule nor
    loaders were passed (both cannot be passed to ``fit``), anomalib's ``Engine`` always passes the
    user's datamodule, and a loop's source is kept in its private ``_data_source`` (a
    ``_DataLoaderSource`` with public ``instance`` and ``name``). Loaders are requested from the
    source when the loop starts, after the model's ``setup`` hook, where this is called.

    Args:
        loop: ``trainer.fit_loop``, ``trainer.fit_loop.epoch_loop.val_loop``, ``trainer.validate_loop``
            or ``trainer.test_loop``.
        model: The LightningModule whose hook (the loop's hook name) serves the loaders from now on.

    Returns:
        ``(instance, hook name)`` of the loop's previous source (a datamodule, or loaders passed
        directly), or ``None`` when it had none or was already ``model``.

    Example:
        >>> previous = redirect_loop_data(trainer.test_loop, model)  # doctest: +SKIP
        >>> previous  # doctest: +SKIP
        (<anomalib.data.MVTecAD object at ...>, 'test_dataloader')
    """
    purpose = "serving Mvfa's own dataloaders (support set, unrepeated DDP shards) to its loops"
    source = require_internal(loop, "_data_source", "lightning", purpose)
    previous = require_internal(source, "instance", "lightning", purpose)
    name = require_internal(source, "name", "lightning", purpose)
    if previous is model:
        return None
    source.instance = model
    return None if previous is None else (previous, name)


def set_default_root_dir(trainer: Any, folder: str) -> None:
    """Make ``trainer.default_root_dir`` return ``folder``.

    Under DDP, anomalib's ``Engine`` makes a new versioned run folder in every process that the
    launcher starts; the processes must share the first one's, where anomalib's visualiser and
    Mvfa write (every process writes the images it scored). No public way exists:
    ``Trainer.default_root_dir`` is a property without a setter over the private
    ``_default_root_dir`` (set once from the ``Trainer`` argument), and the trainer is built
    inside anomalib's ``Engine`` before any process group exists.

    Example:
        >>> set_default_root_dir(trainer, "results/Mvfa/MVTecAD/bottle/v0")  # doctest: +SKIP
    """
    require_internal(trainer, "_default_root_dir", "lightning", "sharing one run folder between DDP processes")
    trainer._default_root_dir = folder


# ------------------------------------------------------------------------------------------------
# anomalib datasets (owned by data/)
# ------------------------------------------------------------------------------------------------


def read_predict_dataset_as(dataset: Any, subclass: type) -> None:
    """Make an existing anomalib ``PredictDataset`` read its files through ``subclass.__getitem__``.

    No public way exists: ``anomalib predict --data <folder>`` and ``Engine.predict(data_path=...)``
    build the ``PredictDataset`` and its ``DataLoader`` inside ``Engine.predict``; the dataset reads
    through anomalib's module-level ``read_image``, and ``__getitem__`` is looked up on the type, not
    the instance; a ``DataLoader`` refuses a new ``dataset`` once built, and Lightning's list of
    prediction loaders is read-only (replacing a loader means writing its loop's private
    ``_combined_loader``). So the instance's class becomes ``subclass``, a subclass of its own class
    that adds nothing to the instance but reads the same ``image_filenames`` and applies the same
    ``transform``: the two attributes anomalib's ``PredictDataset.__init__`` sets, checked here.

    Args:
        dataset: An instance of anomalib's ``PredictDataset`` (exactly that class).
        subclass: A subclass of ``type(dataset)`` whose ``__getitem__`` reads ``image_filenames``.

    Example:
        >>> from anomalib.data import PredictDataset
        >>> from anomalib_mvfa.data import ScanPredictDataset
        >>> read_predict_dataset_as(PredictDataset("images/"), ScanPredictDataset)  # doctest: +SKIP
    """
    if not issubclass(subclass, type(dataset)):
        msg = f"{subclass.__name__} is not a subclass of {type(dataset).__name__}."
        raise TypeError(msg)
    purpose = f"reading anomalib's prediction images with {subclass.__name__}"
    for attribute in ("image_filenames", "transform"):
        require_internal(dataset, attribute, "anomalib", purpose)
    dataset.__class__ = subclass


def list_prediction_scans_with(dataset_class: type) -> None:
    """Let ``anomalib predict --data <path>`` read a folder or file of scans that anomalib lists no image in.

    No public way exists: ``Engine.predict(data_path=...)`` (which ``anomalib predict --data <path>``
    calls) builds ``PredictDataset(data_path)``, looked up as a global of ``anomalib.engine.engine``,
    before any model or callback code runs, and anomalib's listing knows image suffixes only: a
    folder of DICOM files or NIfTI volumes stops with "Found 0 images in <folder>". That global is
    replaced by a function that builds anomalib's own dataset as before and, only where anomalib's
    listing refuses the path (a ``ValueError``), builds ``dataset_class(path)`` instead, whose error
    names the path when it has nothing readable either. Calling it again changes nothing.

    Args:
        dataset_class: A subclass of anomalib's ``PredictDataset`` that takes the path alone.

    Example:
        >>> from anomalib_mvfa.data import ScanPredictDataset
        >>> list_prediction_scans_with(ScanPredictDataset)
    """
    from anomalib.engine import engine as engine_module  # noqa: PLC0415

    purpose = f"listing prediction folders of scans with {dataset_class.__name__}"
    anomalib_dataset = require_internal(engine_module, "PredictDataset", "anomalib", purpose)
    if getattr(anomalib_dataset, "falls_back_to", None) is not None:
        return
    if not issubclass(dataset_class, anomalib_dataset):
        msg = f"{dataset_class.__name__} is not a subclass of anomalib's {anomalib_dataset.__name__}."
        raise TypeError(msg)

    def prediction_dataset(path: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return anomalib_dataset(path, *args, **kwargs)
        except ValueError as refused:  # "Found 0 images in ...", "... is not an image file"
            try:
                return dataset_class(path)
            except ValueError as unreadable:
                raise unreadable from refused

    prediction_dataset.falls_back_to = dataset_class  # type: ignore[attr-defined]
    engine_module.PredictDataset = prediction_dataset


# ------------------------------------------------------------------------------------------------
# torchmetrics and anomalib models (owned by reports/ and commands/)
# ------------------------------------------------------------------------------------------------


@contextmanager
def winclip_without_pretrained_weights() -> Iterator[None]:
    """Within the block, anomalib's WinCLIP builds its CLIP model on random weights, with no download.

    No public way exists: ``WinClipModel.__init__`` passes the module global ``PRETRAINED`` of
    ``anomalib.models.image.winclip.torch_model`` (``"laion400m_e31"``) to
    ``open_clip.create_model_and_transforms``, which downloads those weights; neither ``WinClip`` nor
    ``WinClipModel`` takes a backbone or weights argument, and open_clip has no setting that skips
    the weights of a named tag. ``anomalib-mvfa benchmark --random-weights`` (offline speed studies)
    sets the global to ``None`` for the block and restores it after, also when the block raises.

    Example:
        >>> from anomalib.models import WinClip
        >>> with winclip_without_pretrained_weights():  # doctest: +SKIP
        ...     model = WinClip()
    """
    from anomalib.models.image.winclip import torch_model  # noqa: PLC0415  (only for WinCLIP)

    saved = require_internal(torch_model, "PRETRAINED", "anomalib", "building WinCLIP on random weights offline")
    torch_model.PRETRAINED = None
    try:
        yield
    finally:
        torch_model.PRETRAINED = saved
