"""What MVFA's fit loop iterates over: augmented support sets and labelled zero-shot images.

:class:`TrainingSet` is what :meth:`~anomalib_mvfa.support.FewShotSupport.training_set` returns
to the model at a fit's setup: a dataset whose items are ``(image, mask, label, has_mask,
class_index, index)``, how to batch and shuffle it, and what the model may precompute from it.

Example:
    >>> training_set = support_training_set(normal, abnormal, batch_size=1, seed=0)  # doctest: +SKIP
    >>> batch = next(iter(training_set.loader()))  # doctest: +SKIP
    >>> batch.image.shape  # doctest: +SKIP
    torch.Size([1, 3, 240, 240])
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import MvfaInputError
from ..prompting import prompt_class_name
from .augmentation import augment_support_set
from .selection import SupportImages, resize_image, resize_mask

logger = logging.getLogger(__name__)

# Seeds of the epochs' shuffles: seed * EPOCH_STRIDE + epoch (distinct for any realistic epoch count).
EPOCH_STRIDE = 1_000_003


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


class EpochShuffleSampler(DistributedSampler):
    """A shuffled order per epoch that depends only on the seed and the epoch number, split over processes.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint
    visits the support images in the same order as an uninterrupted run. Unlike the
    ``seed + epoch`` of torch's ``DistributedSampler``, runs with neighbouring seeds do not share
    their epochs' orders.

    Under distributed training (``num_replicas`` N processes, each loading ``batch_size`` b images
    a step), every process draws the same order, cut into steps of N x b images, and process r
    takes the r-th b of each step: step k of the N processes together holds exactly the images of
    step k of one process loading N x b, without a duplicate or a drop. The last, shorter step is
    shared as evenly as it goes. It subclasses torch's ``DistributedSampler`` so that Lightning
    keeps it rather than wrapping it in one of its own (which pads with repeated images).

    Example:
        >>> sampler = EpochShuffleSampler(5, seed=0)
        >>> sampler.set_epoch(3)
        >>> sorted(sampler) == [0, 1, 2, 3, 4]
        True
        >>> halves = [list(EpochShuffleSampler(6, 0, num_replicas=2, rank=r, batch_size=2)) for r in (0, 1)]
        >>> whole = list(EpochShuffleSampler(6, 0))
        >>> halves[0][:2] + halves[1][:2] == whole[:4]
        True

    Raises:
        ValueError: If a process would get no image in the last step (every process must take
            the same number of steps); the message says which batch sizes work.
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0, batch_size: int = 1) -> None:
        # torch's attributes, set without its constructor (which would ask the process group)
        self.dataset, self.num_replicas, self.rank, self.shuffle, self.drop_last = None, num_replicas, rank, True, False
        self.size, self.seed, self.batch_size, self.epoch = size, seed, batch_size, 0
        step = num_replicas * batch_size
        last = size % step
        if num_replicas > 1 and 0 < last < num_replicas:
            msg = (
                f"{size} training images cannot be shared by {num_replicas} processes with batch_size={batch_size}: "
                f"the last step holds {last} image(s), fewer than the processes, and every process must take the "
                "same number of steps. Choose a batch_size for which the training set size modulo "
                f"(processes x batch_size) is 0 or at least {num_replicas}."
            )
            raise MvfaInputError(msg)
        self.num_samples = len(self._shares(list(range(size)))[rank])
        self.total_size = size

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch``."""
        self.epoch = epoch

    def _shares(self, order: list[int]) -> list[list[int]]:
        """Each process's indices of ``order``, step by step."""
        shares: list[list[int]] = [[] for _ in range(self.num_replicas)]
        step = self.num_replicas * self.batch_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            bounds = [round(len(chunk) * r / self.num_replicas) for r in range(self.num_replicas + 1)]
            if len(chunk) == step:
                bounds = [r * self.batch_size for r in range(self.num_replicas + 1)]
            for rank in range(self.num_replicas):
                shares[rank].extend(chunk[bounds[rank] : bounds[rank + 1]])
        return shares

    def __iter__(self) -> Iterator[int]:
        """This process's indices in this epoch's order."""
        generator = torch.Generator().manual_seed(self.seed * EPOCH_STRIDE + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return iter(self._shares(order)[self.rank])

    def __len__(self) -> int:
        """Number of indices of this process."""
        return self.num_samples


@dataclass
class TrainingSet:
    """What the model trains on in one fit.

    Attributes:
        dataset: Items ``(image, mask, label, has_mask, class_index, index)``, images in ``[0, 1]``.
        batch_size: Images per optimisation step.
        seed: Seed of the per-epoch shuffles.
        images: All images of ``dataset`` at once when it holds them in memory (the model may then
            compute their frozen prefix once), else ``None``.
        segmentation: Whether any image has a known mask; without, only the detection loss trains.
        class_names: Prompt class of each ``class_index``; ``None``: the model's own class name.
    """

    dataset: Dataset
    batch_size: int
    seed: int
    images: torch.Tensor | None = None
    segmentation: bool = True
    class_names: list[str] | None = None

    def loader(self) -> DataLoader:
        """Batches of :class:`SupportBatch` in a seeded order per epoch; this process's share under DDP."""
        replicas, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            replicas, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.dataset), self.seed, replicas, rank, self.batch_size),
            collate_fn=SupportDataset.collate,
        )


def support_training_set(normal: SupportImages, abnormal: SupportImages, batch_size: int, seed: int) -> TrainingSet:
    """The few-shot training set: both halves of the support set, augmented.

    As in MVFA, when no abnormal image has a mask the segmentation loss is left out for all
    images: all-zero targets of normal images alone would teach the maps to see nothing.
    """
    support = SupportImages.concatenate([normal, abnormal])
    segmentation = bool(abnormal.has_mask.any())
    if not segmentation:
        support.has_mask = torch.zeros_like(support.has_mask)
        logger.info("MVFA abnormal support images have no masks: only the detection loss is trained.")
    dataset = SupportDataset(support)
    return TrainingSet(dataset, batch_size, seed, images=dataset.images, segmentation=segmentation)


def zero_shot_training_set(datamodule: Any, image_size: int, batch_size: int, seed: int) -> TrainingSet:
    """Zero-shot training set: the labelled images of the training split, read lazily.

    With a ``category`` column (training over several categories), each image is trained with
    its own category's prompts (the datamodule's ``prompt_name``, else the paper's names).
    """
    samples = datamodule.train_data.samples
    class_names = None
    categories = ["all"]
    if "category" in samples:
        categories = sorted(set(samples["category"]))
        prompt_name = getattr(datamodule, "prompt_name", prompt_class_name)
        class_names = [prompt_name(category) for category in categories]
    mask_paths = samples.get("mask_path", [])
    segmentation = any(isinstance(path, str) and path.strip() for path in mask_paths)
    logger.info("MVFA zero-shot training on %d labelled images of %s.", len(samples), categories)
    if not segmentation:
        logger.info("MVFA zero-shot training images have no masks: only the detection loss is trained.")
    dataset = LabelledDataset(datamodule.train_data, image_size, categories)
    return TrainingSet(dataset, batch_size, seed, segmentation=segmentation, class_names=class_names)
