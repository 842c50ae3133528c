"""Few-shot support sets: seeded selection of images, abnormal sources, training batches.

The support set of MVFA is K normal images and K abnormal images (with masks where they
exist), each augmented into 11 variants. Normal images come from a dataset's training
split or a folder; abnormal ones are synthesised from the normal images with anomalib's
Perlin anomaly generator, drawn from a validation split, or read from a folder.

Images are kept in ``[0, 1]`` at the model's input size and are normalised later by the
model's pre-processor.

Example:
    >>> from anomalib_mvfa.support import draw_from_folder
    >>> normal = draw_from_folder("scans/normal", k=4, seed=0, image_size=240)  # doctest: +SKIP
    >>> normal.images.shape  # doctest: +SKIP
    torch.Size([4, 3, 240, 240])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from torch.utils.data import Dataset
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF  # noqa: N812

from .augmentation import augment_support_set
from .image_io import IMAGE_SUFFIXES, read_image_file, read_mask_file

MASK_FOLDER = "masks"


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


@dataclass
class SupportBatch:
    """A training batch; ``PreProcessor`` normalises ``image`` in place.

    ``class_index`` says which prompt class each image belongs to (zero-shot training over
    several categories); it is 0 for a single class. ``index`` is each image's position in
    its dataset (the key of the training prefix cache).
    """

    image: torch.Tensor
    gt_mask: torch.Tensor
    gt_label: torch.Tensor
    has_mask: torch.Tensor
    class_index: torch.Tensor
    index: torch.Tensor


class SupportDataset(Dataset):
    """Augmented support set for the fit loop: MVFA's 11 variants of every support image.

    Args:
        support: The support images (normal and abnormal).

    Example:
        >>> dataset = SupportDataset(support)  # doctest: +SKIP
        >>> loader = DataLoader(dataset, shuffle=True, collate_fn=SupportDataset.collate)  # doctest: +SKIP
    """

    def __init__(self, support: SupportImages) -> None:
        augmented = augment_support_set(support.images, support.masks)
        self.images = augmented.images
        self.masks = augmented.masks
        self.labels = support.labels[augmented.groups]
        self.has_mask = support.has_mask[augmented.groups]

    def __len__(self) -> int:
        """Number of augmented images."""
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """Image, mask, label, mask flag, class index (0) and index of one augmented image."""
        image, mask, label, has_mask = self.images[index], self.masks[index], self.labels[index], self.has_mask[index]
        return image, mask, label, has_mask, torch.tensor(0), torch.tensor(index)

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, ...]]) -> SupportBatch:
        """Stack items into a :class:`SupportBatch`."""
        columns = [torch.stack(column) for column in zip(*items, strict=True)]
        return SupportBatch(*columns)


class LabelledDataset(Dataset):
    """Labelled images of an anomalib dataset for zero-shot training, read lazily.

    Each image is resized to ``image_size``; its mask is used where the dataset has one
    (otherwise it enters the detection loss only); ``class_index`` points into
    ``class_names`` through the sample's ``category`` column.

    Args:
        dataset: An anomalib dataset whose ``samples`` may carry a ``category`` column.
        image_size: Side of the returned images.
        categories: Categories in the order of the prompt classes.
    """

    def __init__(self, dataset: Dataset, image_size: int, categories: Sequence[str]) -> None:
        self.dataset = dataset
        self.image_size = image_size
        samples = dataset.samples
        sample_categories = samples["category"] if "category" in samples else [categories[0]] * len(samples)
        self.class_index = torch.tensor([list(categories).index(category) for category in sample_categories])

    def __len__(self) -> int:
        """Number of images."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        """Image, mask, label, mask flag, class index and index of one image."""
        item = self.dataset[index]
        has_mask = item.gt_mask is not None
        mask = resize_mask(item.gt_mask, self.image_size) if has_mask else torch.zeros(self.image_size, self.image_size)
        label = torch.as_tensor(item.gt_label).long()
        image = resize_image(item.image, self.image_size)
        return image, mask, label, torch.tensor(has_mask), self.class_index[index], torch.tensor(index)


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
            raise ValueError(msg)
        chosen = [by_name[Path(file).name] for file in files]
    elif len(candidates) < k:
        msg = f"{name} holds {len(candidates)} {kind} image(s); k_shot={k} needs at least {k}."
        raise ValueError(msg)
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


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (any letter case of the suffix)."""
    folder = Path(folder)
    if not folder.is_dir():
        msg = f"Support folder '{folder}' does not exist or is not a folder."
        raise ValueError(msg)
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def draw_from_folder(folder: str | Path, k: int, seed: int, image_size: int, label: int = 0) -> SupportImages:
    """Draw ``k`` images from a folder, seeded; masks come from ``<folder>/masks/<same stem>.*``.

    Raises:
        ValueError: If the folder is missing or holds fewer than ``k`` images.
    """
    files = list_images(folder)
    if len(files) < k:
        msg = f"Support folder '{folder}' holds {len(files)} image(s); k_shot={k} needs at least {k}."
        raise ValueError(msg)
    chosen = [files[i] for i in seeded_choice(len(files), k, seed)]
    mask_folder = Path(folder) / MASK_FOLDER
    mask_files = {path.stem: path for path in list_images(mask_folder)} if label and mask_folder.is_dir() else {}
    images = [read_image_file(path) for path in chosen]
    masks: list[torch.Tensor | None] = []
    for path, image in zip(chosen, images, strict=True):
        mask = read_mask_file(mask_files[path.stem]) if path.stem in mask_files else None
        if mask is not None and mask.shape != image.shape[-2:]:
            msg = (
                f"Mask '{mask_files[path.stem]}' is {tuple(mask.shape)} pixels but its image '{path}' is "
                f"{tuple(image.shape[-2:])}."
            )
            raise ValueError(msg)
        masks.append(mask)
    return _support_from_items(images, masks, label, [str(path) for path in chosen], image_size)


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
