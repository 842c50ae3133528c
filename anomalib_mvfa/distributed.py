"""MVFA under Lightning's distributed strategies (DDP over several processes).

- Training: every process draws the same support set; its per-epoch order is split over the
  processes step by step (:class:`~anomalib_mvfa.support.datasets.EpochShuffleSampler`) and each
  process divides its loss by the mean of the processes' totals (:func:`~anomalib_mvfa.loss.distributed_total`),
  so N processes loading b images a step train the adapters as one process loading N x b.
- Validation and test: Lightning shards evaluation with torch's ``DistributedSampler``, which
  repeats images to even out the shards, and anomalib's metrics and thresholds would then count
  those images twice. :class:`EvaluationSharding` serves the same loaders with Lightning's
  ``UnrepeatedDistributedSampler`` instead: every image is scored once, by one process.
  (Lightning's prediction loop already shards without repeats.)
- Files are written by the process of rank 0, in one run folder: anomalib's Engine makes a new
  versioned folder (``v0``, ``v1``, ...) in every process that Lightning's ``ddp`` launcher, torchrun
  or SLURM starts, so :func:`share_run_folder` gives every process the first one's.

Example:
    anomalib train --model anomalib_mvfa.Mvfa --trainer.strategy ddp --trainer.devices 2 --data ...
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

from ._compat import redirect_loop_data, set_default_root_dir

logger = logging.getLogger(__name__)

# Lightning's evaluation loops and the hooks that feed them
EVALUATION_HOOKS = ("val_dataloader", "test_dataloader")


def process_rank_and_count() -> tuple[int, int]:
    """This process's rank and the number of processes of its group; ``(0, 1)`` outside one.

    Example:
        >>> process_rank_and_count()  # one process
        (0, 1)
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def launched_processes() -> int:
    """How many processes a launcher (torchrun, Lightning's ``ddp``, SLURM's ``srun``) started for this run."""
    counts = [process_rank_and_count()[1]]
    counts += [
        int(os.environ[name]) for name in ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS") if os.environ.get(name, "").isdigit()
    ]
    return max(counts)


def gather_shards(columns: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """Every process's rows, put back in dataset order: what one process scoring everything holds.

    ``columns`` holds this process's rows (first dimension) of the dataset items ``indices``; a
    process without rows passes ``{}``. Gathers with ``all_gather_object`` (CPU tensors), so every
    process gets the whole table. Outside a process group, ``columns`` as they are.

    Example:
        >>> gather_shards({"score": torch.tensor([0.5, 0.1])}, [1, 0])["score"]  # one process
        tensor([0.5000, 0.1000])
    """
    processes = process_rank_and_count()[1]
    if processes == 1:
        return columns
    shards: list[Any] = [None] * processes
    torch.distributed.all_gather_object(shards, ({key: value.cpu() for key, value in columns.items()}, list(indices)))
    order = torch.tensor([index for _, shard_indices in shards for index in shard_indices]).argsort()
    keys = next((list(shard) for shard, _ in shards if shard), [])
    return {key: torch.cat([shard[key] for shard, _ in shards if shard])[order] for key in keys}


def unrepeated_loader(loader: DataLoader, replicas: int, rank: int) -> DataLoader:
    """``loader`` with this process's share of its dataset, in order, no image repeated.

    Example:
        >>> loader = DataLoader(list(range(5)), batch_size=2)
        >>> [batch.tolist() for batch in unrepeated_loader(loader, replicas=2, rank=1)]
        [[1, 3]]
    """
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=replicas, rank=rank, shuffle=False)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=False,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


def process_share(loader: DataLoader) -> tuple[DataLoader, list[int]]:
    """``loader`` with this process's unrepeated share of its dataset, and the dataset indices of that share.

    The same shards as :class:`EvaluationSharding` gives Lightning's loops (every N-th item, none
    repeated); :func:`gather_shards` puts the processes' rows back in dataset order. Outside a process
    group, the whole dataset in order.

    Example:
        >>> shard, indices = process_share(DataLoader(list(range(5)), batch_size=2))  # one process
        >>> indices
        [0, 1, 2, 3, 4]
    """
    rank, processes = process_rank_and_count()
    shard = unrepeated_loader(loader, replicas=processes, rank=rank)
    return shard, list(shard.sampler)


class EvaluationSharding:
    """Where a distributed run's validation and test loaders come from, served without repeats.

    :meth:`install` points Lightning's validation and test loops at the model (whose
    ``val_dataloader``/``test_dataloader`` call :meth:`loaders`), remembering their sources
    (:func:`~anomalib_mvfa._compat.redirect_loop_data`).
    """

    def __init__(self) -> None:
        self.sources: dict[str, Any] = {}

    def install(self, trainer: Any, model: Any) -> None:
        """Redirect the evaluation loops of ``trainer`` to ``model`` when it runs several processes.

        Called at every stage's setup; a loop already pointing at ``model`` keeps the source
        remembered when it was redirected.
        """
        if trainer.world_size == 1:
            return
        loops = {
            "val_dataloader": [trainer.fit_loop.epoch_loop.val_loop, trainer.validate_loop],
            "test_dataloader": [trainer.test_loop],
        }
        for hook, hook_loops in loops.items():
            for loop in hook_loops:
                previous = redirect_loop_data(loop, model)
                if previous is not None:
                    self.sources[hook] = _Source(*previous)

    def loaders(self, hook: str, trainer: Any) -> Any:
        """The loaders of ``hook``'s source, each with this process's unrepeated share; ``[]`` without one."""
        source = self.sources.get(hook)
        if source is None:
            return []
        loaders = source.dataloaders(trainer)
        return apply_to_collection(
            loaders, DataLoader, unrepeated_loader, replicas=trainer.world_size, rank=trainer.global_rank
        )


def sharded_loaders_hook(hook: str) -> Callable[[Any], Any]:
    """A ``val_dataloader`` or ``test_dataloader`` hook serving the model's ``evaluation_sharding`` loaders.

    Example:
        >>> class Model(LightningModule):
        ...     val_dataloader = sharded_loaders_hook("val_dataloader")  # doctest: +SKIP
    """

    def loaders(model: Any) -> Any:
        return model.evaluation_sharding.loaders(hook, model.trainer)

    loaders.__name__ = loaders.__qualname__ = hook
    loaders.__doc__ = f"Under DDP, the datamodule's ``{hook}`` loaders with every image scored once, by one process."
    return loaders


class _Source:
    """A datamodule (whose hook is called) or the loaders themselves."""

    def __init__(self, instance: Any, name: str) -> None:
        self.instance, self.name = instance, name

    def dataloaders(self, trainer: Any) -> Any:
        from lightning.pytorch import LightningDataModule  # noqa: PLC0415

        del trainer
        if isinstance(self.instance, LightningDataModule):
            return getattr(self.instance, self.name)()
        return self.instance


def share_run_folder(trainer: Any) -> None:
    """Make every process of a distributed run write under the first process's run folder.

    A process whose folder differs (anomalib's Engine made a version folder of its own) takes the
    first process's, removes its own while it is still empty, and the first process points the
    ``latest`` link back at its folder.
    """
    if trainer.world_size == 1:
        return
    own = Path(trainer.default_root_dir)
    shared = Path(trainer.strategy.broadcast(str(own), src=0))
    if shared != own:
        set_default_root_dir(trainer, str(shared))
        # a link (``latest``, pointing at another run) is never removed, nor anything below it
        if own.is_dir() and not own.is_symlink() and not any(path.is_file() for path in own.rglob("*")):
            for folder in sorted((path for path in own.rglob("*") if path.is_dir()), reverse=True):
                folder.rmdir()
            own.rmdir()
        logger.info("Process %d writes under the first process's run folder %s.", trainer.global_rank, shared)
    trainer.strategy.barrier()
    latest = shared.parent / "latest"
    if trainer.is_global_zero and latest.is_symlink() and latest.resolve() != shared.resolve():
        latest.unlink()
        os.symlink(shared, latest, target_is_directory=True)
