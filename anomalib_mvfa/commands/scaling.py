"""How MVFA scales over processes: ``anomalib-mvfa scaling``.

Trains few-shot MVFA and tests it through anomalib's Engine on the demo's generated histology
data, once in one process and once under DDP (Lightning's ``ddp_spawn``) in ``--processes``
processes, with the same global batch and, on the CPU, the same total number of threads (split
evenly over the processes). It prints the training samples (augmented support images) and test
images per second of both runs, timed from the first to the last batch of each loop, and their
ratio. On GPUs, ``--accelerator gpu`` runs one process per device.

Example:
    anomalib-mvfa scaling --backbone ViT-B-16 --image-size 224 --processes 2
    anomalib-mvfa scaling --accelerator gpu --processes 4 --backbone ViT-L-14-336 --image-size 240
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from ..backbone import tower_depth
from ..errors import MvfaInputError
from .options import scaling as add_arguments  # noqa: F401  (the command's arguments, kept importable here)


class LoopTimer(Callback):
    """Times the training epochs and the test loop; sets each process's threads.

    The first process writes ``<folder>/train.json`` and ``<folder>/test.json`` (spawned processes
    get copies of this callback: what they measure comes back through the files).
    """

    def __init__(self, folder: Path, threads: int | None) -> None:
        self.folder, self.threads = folder, threads
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {"train": 0.0, "test": 0.0}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Give the process its share of the threads (CPU)."""
        del trainer, pl_module, stage
        if self.threads:
            torch.set_num_threads(self.threads)

    def _start(self, name: str) -> None:
        self.started[name] = time.perf_counter()

    def _stop(self, trainer: Any, name: str) -> None:
        trainer.strategy.barrier()  # every process has finished the loop
        self.seconds[name] += time.perf_counter() - self.started[name]
        if trainer.is_global_zero:
            (self.folder / f"{name}.json").write_text(json.dumps(self.seconds[name]))

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the epoch's clock."""
        del pl_module
        trainer.strategy.barrier()
        self._start("train")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Stop it."""
        del pl_module
        self._stop(trainer, "train")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the test loop's clock."""
        del pl_module
        trainer.strategy.barrier()
        self._start("test")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Stop it."""
        del pl_module
        self._stop(trainer, "test")


def _run(args: argparse.Namespace, folder: Path, data: Path, processes: int) -> dict[str, float]:
    from anomalib.engine import Engine  # noqa: PLC0415

    from ..data import MedicalFolder  # noqa: PLC0415
    from ..lightning_model import Mvfa  # noqa: PLC0415

    depth = tower_depth(args.backbone)
    layers = [round(depth * (i + 1) / 4) for i in range(4)]
    total_threads = args.threads or torch.get_num_threads()
    threads = max(1, total_threads // processes) if args.accelerator == "cpu" else None
    record = folder / f"seconds_{processes}"
    record.mkdir()
    model = Mvfa(
        backbone=args.backbone,
        pretrained=None,
        image_size=args.image_size,
        feature_layers=layers,
        k_shot=args.k_shot,
        epochs=args.epochs,
        batch_size=args.batch_size // processes,
        seed=args.seed,
    )
    datamodule = MedicalFolder(
        root=data,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        mask_dir="ground_truth/defect",
        eval_batch_size=args.batch_size // processes,
        num_workers=0,
        seed=args.seed,
    )
    engine = Engine(
        default_root_dir=folder / f"run{processes}",
        accelerator=args.accelerator,
        devices=processes,
        strategy="ddp_spawn" if processes > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        callbacks=[LoopTimer(record, threads)],
    )
    if threads:
        torch.set_num_threads(threads)
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule, verbose=False)
    seconds = {name: json.loads((record / f"{name}.json").read_text()) for name in ("train", "test")}
    datamodule.setup()
    support = 2 * args.k_shot * 11 * args.epochs
    return {
        "threads": float(threads or 0),
        "train": support / seconds["train"],
        "test": len(datamodule.test_data) / seconds["test"],
    }


def run(args: argparse.Namespace) -> int:
    """Measure one process against ``--processes`` and print both; return an exit code."""
    from .demo import generate_dataset  # noqa: PLC0415

    if args.batch_size % args.processes:
        msg = f"--batch-size {args.batch_size} must be a multiple of --processes {args.processes}."
        raise MvfaInputError(msg)
    total_threads = args.threads or torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="mvfa-scaling-") as name:
        folder = Path(name)
        data = generate_dataset(folder / "data", seed=args.seed)
        rates = {processes: _run(args, folder, data, processes) for processes in (1, args.processes)}
    print(
        f"{args.backbone} at {args.image_size} (random weights), {args.k_shot}-shot, {args.epochs} epoch(s), "
        f"global batch {args.batch_size}, {args.accelerator}"
        + (f", {total_threads} threads in all" if args.accelerator == "cpu" else "")
    )
    for processes, rate in rates.items():
        threads = f" x {int(rate['threads'])} threads" if rate["threads"] else ""
        print(
            f"  {processes} process(es){threads}: training {rate['train']:.1f} samples/s, "
            f"test {rate['test']:.1f} images/s"
        )
    many, one = rates[args.processes], rates[1]
    print(
        f"  {args.processes} processes against 1: training {many['train'] / one['train']:.2f}x, "
        f"test {many['test'] / one['test']:.2f}x"
    )
    return 0
