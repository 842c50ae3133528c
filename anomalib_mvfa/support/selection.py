"""Where MVFA's support images come from: settings, sources and seeded draws.

The support set of MVFA is K normal images and K abnormal images (with masks where they
exist). Normal images come from a dataset's training split or a folder; abnormal ones are
synthesised from the normal images with anomalib's Perlin anomaly generator, drawn from a
validation or training split, or read from a folder (:func:`draw_normal`, :func:`draw_abnormal`).

Images are kept in ``[0, 1]`` at the model's input size and are normalised later by the
model's pre-processor.

Example:
    >>> from anomalib_mvfa.support import draw_from_folder
    >>> normal = draw_from_folder("scans/normal", k=4, seed=0, image_size=240)  # doctest: +SKIP
    >>> normal.images.shape  # doctest: +SKIP
    torch.Size([4, 3, 240, 240])
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from ..data.datasets import file_key
from ..data.readers import DEFAULT_READER, SampleName, ScanReader, list_scan_files
from ..errors import MvfaInputError

logger = logging.getLogger(__name__)

MASK_FOLDER = "masks"
ABNORMAL_SOURCES = ("auto", "synthetic", "validation", "train")


@dataclass(frozen=True)
class SupportSettings:
    """What the support set is drawn from and how it is served.

    Attributes:
        k_shot: Normal support images (and as many abnormal ones); 0: zero-shot.
        seed: Seed of the draws, the synthetic anomalies and the shuffling.
        image_size: Side of the support images.
        abnormal_source: ``"auto"``, ``"synthetic"``, ``"validation"``, ``"train"`` or a folder.
        few_shot_source: Folder of normal support images instead of the training split.
        batch_size: Support images per optimisation step.

    Example:
        >>> SupportSettings(k_shot=4, abnormal_source="synthetic").seed
        0
    """

    k_shot: int = 4
    seed: int = 0
    image_size: int = 240
    abnormal_source: str = "auto"
    few_shot_source: str | None = None
    batch_size: int = 1


@dataclass
class SupportImages:
    """Support images in ``[0, 1]`` at the model's input size.

    Attributes:
        images: ``N x 3 x H x W``.
        masks: ``N x H x W`` binary masks (zeros for normal images).
        labels: ``N`` labels, 1 for abnormal.
        has_mask: ``N`` booleans: whether the mask is known (enters the segmentation loss).
        sources: ``N`` descriptions of where each image came from (file paths).
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    has_mask: torch.Tensor
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    @classmethod
    def concatenate(cls, parts: Sequence[SupportImages]) -> SupportImages:
        """Join several support sets, in order."""
        return cls(
            images=torch.cat([part.images for part in parts]),
            masks=torch.cat([part.masks for part in parts]),
            labels=torch.cat([part.labels for part in parts]),
            has_mask=torch.cat([part.has_mask for part in parts]),
            sources=[source for part in parts for source in part.sources],
        )


def resize_image(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize a ``C x H x W`` (or batched) image to ``image_size`` (bicubic, antialiased), 3 channels."""
    image = image.float()
    if image.shape[-3] == 1:
        image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    resized = TF.resize(image, [image_size, image_size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return resized.clamp(0.0, 1.0)


def resize_mask(mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize an ``H x W`` mask to ``image_size`` (nearest) and binarise it at 0.5."""
    mask = mask.float().reshape(1, *mask.shape[-2:])
    resized = TF.resize(mask, [image_size, image_size], interpolation=InterpolationMode.NEAREST)
    return (resized[0] > 0.5).float()


def seeded_choice(count: int, k: int, seed: int) -> list[int]:
    """``k`` distinct indices out of ``count``, drawn with ``seed``, in increasing order."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(count, generator=generator)[:k].tolist())


def _support_from_items(
    images: list[torch.Tensor],
    masks: list[torch.Tensor | None],
    label: int,
    sources: list[str],
    image_size: int,
) -> SupportImages:
    return SupportImages(
        images=torch.stack([resize_image(image, image_size) for image in images]),
        masks=torch.stack(
            [torch.zeros(image_size, image_size) if m is None else resize_mask(m, image_size) for m in masks]
        ),
        labels=torch.full((len(images),), label, dtype=torch.long),
        has_mask=torch.tensor([label == 0 or m is not None for m in masks]),
        sources=sources,
    )


def draw_from_dataset(
    dataset: Dataset,
    label: int,
    k: int,
    seed: int,
    image_size: int,
    name: str,
    files: Sequence[str] | None = None,
) -> SupportImages:
    """Draw ``k`` images with ``label`` from an anomalib dataset (its ``samples`` table), seeded.

    Args:
        dataset: An anomalib ``AnomalibDataset``.
        label: 0 for normal images, 1 for abnormal ones.
        k: Number of images.
        seed: Seed of the draw.
        image_size: Side of the returned images.
        name: How error messages name the dataset (for example "the training split").
        files: File names (or paths) to take instead of a random draw (a seed file's line).

    Raises:
        ValueError: If the dataset holds fewer than ``k`` images with ``label``, or a named
            file is not among them.
    """
    samples = dataset.samples
    candidates = samples.index[samples.label_index == label].tolist()
    kind = "abnormal" if label else "normal"
    if files is not None:
        by_name = {Path(samples.loc[i, "image_path"]).name: i for i in candidates}
        missing = [file for file in files if Path(file).name not in by_name]
        if missing:
            msg = f"{name} has no {kind} image named {missing} (named by the seed file)."
            raise MvfaInputError(msg)
        chosen = [by_name[Path(file).name] for file in files]
    elif len(candidates) < k:
        msg = f"{name} holds {len(candidates)} {kind} image(s); k_shot={k} needs at least {k}."
        raise MvfaInputError(msg)
    else:
        chosen = [candidates[i] for i in seeded_choice(len(candidates), k, seed)]
    positions = [samples.index.get_loc(index) for index in chosen]
    items = [dataset[position] for position in positions]
    has_masks = [bool(str(samples.iloc[p].get("mask_path", "") or "").strip()) for p in positions]
    return _support_from_items(
        [item.image for item in items],
        [item.gt_mask if has or label == 0 else None for item, has in zip(items, has_masks, strict=True)],
        label,
        [str(item.image_path) for item in items],
        image_size,
    )


def list_images(folder: str | Path, reader: ScanReader | None = None) -> list[str]:
    """Samples of the files directly inside ``folder`` (images, DICOM frames, NIfTI slices), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"Support folder '{folder}' does not exist or is not a folder."
        raise MvfaInputError(msg)
    reader = reader or DEFAULT_READER
    return [name for path in list_scan_files(folder, recursive=False) for name in reader.samples(path)]


def draw_from_folder(
    folder: str | Path, k: int, seed: int, image_size: int, label: int = 0, reader: ScanReader | None = None
) -> SupportImages:
    """Draw ``k`` samples from a folder, seeded; masks come from ``<folder>/masks/<same name>.*``.

    Args:
        folder: The folder (images, DICOM, NIfTI volumes: every frame and slice is a sample).
        k: How many.
        seed: Seed of the draw.
        image_size: Side the samples are resized to.
        label: 0 (normal) or 1 (abnormal: masks are read).
        reader: The reader (the datamodule's, so that support and test images are read alike).

    Raises:
        ValueError: If the folder is missing or holds fewer than ``k`` samples.
    """
    reader = reader or DEFAULT_READER
    names = list_images(folder, reader)
    if len(names) < k:
        msg = f"Support folder '{folder}' holds {len(names)} image(s); k_shot={k} needs at least {k}."
        raise MvfaInputError(msg)
    chosen = [names[i] for i in seeded_choice(len(names), k, seed)]
    mask_folder = Path(folder) / MASK_FOLDER
    mask_files = (
        {file_key(path): path for path in list_scan_files(mask_folder, recursive=False)}
        if label and mask_folder.is_dir()
        else {}
    )
    images = [reader.read_image(name) for name in chosen]
    masks: list[torch.Tensor | None] = []
    for name, image in zip(chosen, images, strict=True):
        sample = SampleName.parse(name)
        mask_file = mask_files.get(file_key(sample.file))
        mask_name = str(SampleName(mask_file, sample.part, sample.index)) if mask_file is not None else None
        mask = reader.read_mask(mask_name) if mask_name is not None else None
        if mask is not None and mask.shape != image.shape[-2:]:
            msg = (
                f"Mask '{mask_name}' is {tuple(mask.shape)} pixels but its image '{name}' is {tuple(image.shape[-2:])}."
            )
            raise MvfaInputError(msg)
        masks.append(mask)
    return _support_from_items(images, masks, label, chosen, image_size)


def synthesize_abnormal(normal: SupportImages, seed: int) -> SupportImages:
    """Abnormal copies of the normal images made by anomalib's Perlin anomaly generator, seeded.

    The generator's masks become the segmentation targets. The global random state is
    left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images, masks = PerlinAnomalyGenerator(probability=1.0)(normal.images)  # its init draws numbers too
    return SupportImages(
        images=images.clamp(0.0, 1.0),
        masks=(masks[:, 0] > 0.5).float(),
        labels=torch.ones(len(normal), dtype=torch.long),
        has_mask=torch.ones(len(normal), dtype=torch.bool),
        sources=[f"perlin({source})" for source in normal.sources],
    )


# ------------------------------------------------------------------ sources


def shares_test_images(datamodule: Any, dataset: Any) -> bool:
    """Whether ``dataset`` shares image files with the datamodule's test split."""
    test_data = getattr(datamodule, "test_data", None)
    if test_data is None or dataset is None:
        return False
    return not set(dataset.samples.image_path).isdisjoint(test_data.samples.image_path)


def resolve_abnormal_source(settings: SupportSettings, datamodule: Any) -> str:
    """The abnormal source a fit uses: ``"auto"`` resolved against the datamodule, a folder checked.

    ``"auto"`` is ``"train"`` when the training split holds at least K abnormal images, else
    ``"synthetic"``.

    Raises:
        ValueError: If the source is neither a known name nor an existing folder.
    """
    source = settings.abnormal_source
    if source == "auto":
        train_data = getattr(datamodule, "train_data", None)
        if train_data is not None and (train_data.samples.label_index == 1).sum() >= settings.k_shot:
            return "train"
        return "synthetic"
    if source not in ABNORMAL_SOURCES and not Path(source).is_dir():
        msg = f"abnormal_source must be one of {ABNORMAL_SOURCES} or an existing folder, got '{source}'."
        raise MvfaInputError(msg)
    return source


def fixed_files(datamodule: Any, settings: SupportSettings, kind: str) -> list[str] | None:
    """Files a datamodule's seed file fixes for the seed (``MedicalAD(seed_file=...)``), else ``None``."""
    support_files = getattr(datamodule, "support_files", None)
    if not callable(support_files):
        return None
    if "k_shot" in inspect.signature(support_files).parameters:
        fixed = support_files(settings.seed, k_shot=settings.k_shot, kinds=(kind,))
    else:
        fixed = support_files(settings.seed)
    return None if fixed is None else fixed[kind]


def draw_normal(settings: SupportSettings, datamodule: Any) -> SupportImages:
    """The K normal support images: from ``few_shot_source``, else the datamodule's training split.

    Raises:
        ValueError: If neither exists, or the source holds too few normal images.
    """
    if settings.few_shot_source:
        normal = draw_from_folder(
            settings.few_shot_source,
            settings.k_shot,
            settings.seed,
            settings.image_size,
            reader=getattr(datamodule, "reader", None),
        )
    elif datamodule is not None and getattr(datamodule, "train_data", None) is not None:
        normal = draw_from_dataset(
            datamodule.train_data,
            0,
            settings.k_shot,
            settings.seed,
            settings.image_size,
            "The training split",
            files=fixed_files(datamodule, settings, "normal"),
        )
    else:
        msg = (
            "Mvfa needs normal support images: give the trainer a datamodule with a training split, "
            "or set few_shot_source to a folder of normal images."
        )
        raise MvfaInputError(msg)
    logger.info("MVFA normal support images (seed %d): %s", settings.seed, normal.sources)
    return normal


def draw_abnormal(settings: SupportSettings, normal: SupportImages, datamodule: Any) -> SupportImages:
    """The K abnormal support images from the resolved ``abnormal_source``.

    Raises:
        ValueError: If the source is missing, holds too few abnormal images, or is the test split.
    """
    source = resolve_abnormal_source(settings, datamodule)
    if source == "synthetic":
        abnormal = synthesize_abnormal(normal, settings.seed)
    elif source in {"validation", "train"}:
        split = "val_data" if source == "validation" else "train_data"
        dataset = getattr(datamodule, split, None)
        if dataset is None:
            msg = f"abnormal_source='{source}' needs a datamodule with a {split} split; none was found."
            raise MvfaInputError(msg)
        if shares_test_images(datamodule, dataset):
            msg = (
                f"abnormal_source='{source}' would draw support images from the test split: the datamodule's "
                f"{split} shares images with test_data (anomalib's val_split_mode 'same_as_test' does this). "
                "Use a disjoint validation split, for example --data.val_split_mode from_test."
            )
            raise MvfaInputError(msg)
        name = "The validation split" if source == "validation" else "The training split"
        files = fixed_files(datamodule, settings, "abnormal")
        abnormal = draw_from_dataset(dataset, 1, settings.k_shot, settings.seed, settings.image_size, name, files)
    else:
        reader = getattr(datamodule, "reader", None)
        abnormal = draw_from_folder(source, settings.k_shot, settings.seed, settings.image_size, 1, reader)
    logger.info("MVFA abnormal support images (%s): %s", source, abnormal.sources)
    return abnormal
