"""MVFA under real DDP: two CPU processes (gloo, ``ddp_spawn``) against one process.

Two processes loading b images a step must train the adapters of one process loading 2 x b,
build the same memory banks, and score every test image exactly once to the same metrics.

A test here runs once more (and the run says so: pytest-rerunfailures' "R") only when one of its
spawned processes died by a signal: torch's gloo can abort a process as it exits (a C++ exception
in a worker thread, or tensors freed during interpreter shutdown), outside any code of this package
or of the test. CI saw it in two different tests of this file (torch 2.10 and 2.14: a SIGABRT of one
of the two processes), and 21 runs of the first of them here saw none.
A failed assertion or a Python exception in a process is never rerun.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback
from torch.nn import functional as F  # noqa: N812

from anomalib_mvfa import Mvfa, run_files
from anomalib_mvfa.commands import main
from anomalib_mvfa.data import MedicalAD, MedicalFolder, ScanFolder, VolumeMapWriter
from anomalib_mvfa.loss import MvfaLoss, dice_loss, focal_loss
from anomalib_mvfa.torch_model import TrainingOutputs

from .conftest import TINY_IMAGE_SIZE, folder_datamodule, write_dataset
from .test_evaluation import TINY as EVALUATE_TINY
from .test_lightning import ANOMALIB_MVFA, TINY_CLI, run_anomalib
from .test_scan_folders import write_nifti_folder

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}
# rerun once when a spawned process died by a signal (torch.multiprocessing's ProcessExitedException names it)
pytestmark = pytest.mark.flaky(reruns=1, only_rerun=[r"process \d+ terminated with signal SIG"])
# float32 sums in another order (two halves all-reduced against one batch), through Adam's normalisation
ADAPTER_TOLERANCE = 1e-6
# after several Adam steps: a LeakyReLU pre-activation within float32 noise of 0 can take the other slope in
# one of the runs, and Adam turns that into steps of the learning rate's size (measured with torch 2.14:
# 4e-3 of the training's own change after 22 steps); a wrong batch split or averaging moves far more
TRAINED_RELATIVE_TOLERANCE = 2e-2


def engine(root: Path, processes: int, callbacks: list[Callback] | None = None, **trainer: object) -> Engine:
    return Engine(
        default_root_dir=root,
        accelerator="cpu",
        devices=processes,
        strategy="ddp_spawn" if processes > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        callbacks=callbacks or [],
        **trainer,
    )


def adapters(model: Mvfa) -> torch.Tensor:
    parameters = [*model.model.seg_adapters.parameters(), *model.model.det_adapters.parameters()]
    return torch.cat([parameter.detach().flatten() for parameter in parameters])


class RecordTestImages(Callback):
    """Each process appends the test images it scored to ``<folder>/rank<r>.txt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        with open(self.folder / f"rank{trainer.global_rank}.txt", "a") as file:
            file.writelines(f"{path}\n" for path in batch.image_path)


class RecordMemoryBanks(Callback):
    """Each process saves the memory banks and calibration it built to ``<folder>/banks<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module) -> None:
        names = ("seg_memory_bank", "det_memory_bank", "calibration")
        banks = {name: getattr(pl_module.model, name).cpu() for name in names}
        torch.save(banks, self.folder / f"banks{trainer.global_rank}.pt")


class RecordRunFiles(Callback):
    """In each process, records which process writes ``support_set.json`` and the adapter file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage) -> None:
        rank, folder = trainer.global_rank, self.folder
        write, save = run_files.write_atomically, type(pl_module).save_adapters

        def record(kind: str) -> None:
            with open(folder / f"{kind}.txt", "a") as file:
                file.write(f"{rank}\n")

        def recorded_write(path, writer):
            record("support_set")
            return write(path, writer)

        def recorded_save(model, path):
            record("adapters")
            return save(model, path)

        run_files.write_atomically = recorded_write  # this process's module only (spawned processes)
        type(pl_module).save_adapters = recorded_save


def scored_images(folder: Path) -> list[str]:
    return [line for path in sorted(folder.glob("rank*.txt")) for line in path.read_text().split()]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """The folder dataset with an odd number of test images (the shards cannot be even)."""
    root = write_dataset(tmp_path_factory.mktemp("odd"), "folder")
    for name in ("004.png", "005.png"):
        os.remove(root / "test" / "good" / name)
    os.remove(root / "test" / "broken" / "005.png")
    os.remove(root / "ground_truth" / "broken" / "005.png")
    return root


def test_two_processes_train_and_test_as_one_with_twice_the_batch(odd_folder, tmp_path) -> None:
    # a coreset of the memory banks (seeded k-center-greedy), under --trainer.deterministic
    one = Mvfa(**TINY, k_shot=2, epochs=2, batch_size=4, memory_bank_ratio=0.5)
    single = engine(tmp_path / "one", 1, deterministic=True)
    single.fit(one, datamodule=folder_datamodule(odd_folder))
    two = Mvfa(**TINY, k_shot=2, epochs=2, batch_size=2, memory_bank_ratio=0.5)
    (tmp_path / "writes").mkdir()
    recorders = [RecordRunFiles(tmp_path / "writes"), RecordMemoryBanks(tmp_path / "writes")]
    double = engine(tmp_path / "two", 2, recorders, deterministic=True)
    double.fit(two, datamodule=folder_datamodule(odd_folder))
    # the logged epoch losses are those of the whole batch, not of one process's share
    for name in ("train_loss", "train_det_loss", "train_seg_loss"):
        expected = float(single.trainer.callback_metrics[name])
        assert float(double.trainer.callback_metrics[name]) == pytest.approx(expected, abs=1e-5), name

    start = adapters(Mvfa(**TINY))
    assert (adapters(one) - start).abs().max() > 100 * ADAPTER_TOLERANCE  # the adapters trained
    change = (adapters(one) - start).norm()
    assert (adapters(two) - adapters(one)).norm() / change < TRAINED_RELATIVE_TOLERANCE
    for name in ("seg_memory_bank", "det_memory_bank", "calibration"):
        expected = getattr(one.model, name)
        assert expected.numel() > 0
        # built from adapters that differ as above, the greedy coreset may pick other rows: the same size
        assert getattr(two.model, name).shape == expected.shape, name
    # every process built the same banks (the checkpoint holds the first process's)
    first, second = (torch.load(tmp_path / "writes" / f"banks{rank}.pt", weights_only=True) for rank in range(2))
    for name, bank in first.items():
        assert torch.equal(bank, second[name]), name
    full_bank = Mvfa(**TINY, k_shot=2, epochs=0)
    engine(tmp_path / "full", 1).fit(full_bank, datamodule=folder_datamodule(odd_folder))
    assert one.model.seg_memory_bank.shape[1] < full_bank.model.seg_memory_bank.shape[1]  # a coreset was taken
    # the first process wrote the run's files, once each
    for kind in ("support_set", "adapters"):
        assert (tmp_path / "writes" / f"{kind}.txt").read_text().split() == ["0"], kind
    assert len(list((tmp_path / "two").rglob("support_set.json"))) == 1

    results, seen = {}, {}
    for processes in (1, 2):
        folder = tmp_path / f"test{processes}"
        folder.mkdir()
        tested = engine(folder, processes, [RecordTestImages(folder)])
        results[processes] = tested.test(one, datamodule=folder_datamodule(odd_folder))[0]
        seen[processes] = scored_images(folder)
    split = folder_datamodule(odd_folder)
    split.setup()
    expected = sorted(split.test_data.samples.image_path)
    assert len(expected) % 2 == 1  # two shards cannot be even
    assert sorted(seen[1]) == expected
    assert sorted(seen[2]) == expected  # every test image once, none repeated to even the shards
    assert len(list((tmp_path / "test2").glob("rank*.txt"))) == 2  # both processes scored
    assert results[2] == pytest.approx(results[1], abs=1e-6)


def test_zero_shot_training_across_datasets_is_shared_by_the_processes(medical_root, tmp_path) -> None:
    trained, logged = {}, {}
    for processes, batch_size in ((1, 4), (2, 2)):
        model = Mvfa(**TINY, k_shot=0, epochs=2, batch_size=batch_size, seg_learning_rate=1e-3, det_learning_rate=1e-3)
        datamodule = MedicalAD(
            root=medical_root, category="Liver", train_categories=["Brain", "Chest"], num_workers=0, eval_batch_size=4
        )
        fitted = engine(tmp_path / str(processes), processes)
        fitted.fit(model, datamodule=datamodule)
        trained[processes] = adapters(model)
        logged[processes] = {name: float(value) for name, value in fitted.trainer.callback_metrics.items()}
    assert (trained[1] - adapters(Mvfa(**TINY))).abs().max() > 100 * ADAPTER_TOLERANCE
    assert torch.allclose(trained[2], trained[1], atol=ADAPTER_TOLERANCE, rtol=0)
    # the logged epoch losses are those of the whole batch (Brain has masks, Chest's abnormal images none)
    for name in ("train_loss", "train_det_loss", "train_seg_loss"):
        assert logged[2][name] == pytest.approx(logged[1][name], abs=1e-5), name


def test_volume_maps_of_two_processes_are_those_of_one(tmp_path) -> None:
    root = write_nifti_folder(tmp_path / "volumes")
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    datamodule = MedicalFolder(
        root=root, normal_dir="normal", abnormal_dir="abnormal", mask_dir="masks", num_workers=0, seed=0,
        train_batch_size=4, eval_batch_size=4,
    )  # fmt: skip
    engine(tmp_path / "fit", 1).fit(model, datamodule=datamodule)
    for processes in (1, 2):
        writer = VolumeMapWriter(tmp_path / f"maps{processes}")
        engine(tmp_path / f"predict{processes}", processes, [writer]).predict(
            model, datamodule=ScanFolder(root / "abnormal", num_workers=0, eval_batch_size=2), return_predictions=False
        )
    for case in ("case0", "case1"):
        for kind in ("anomaly_map", "pred_mask"):
            one = nib.load(tmp_path / "maps1" / f"{case}_{kind}.nii.gz").get_fdata()
            two = nib.load(tmp_path / "maps2" / f"{case}_{kind}.nii.gz").get_fdata()
            if kind == "anomaly_map":
                assert (one != 0).sum() > 0.5 * one.size  # every slice was scored
            # every slice (each scored by one of the two processes) is in the volume the first one wrote
            np.testing.assert_allclose(two, one, atol=1e-6)


def test_a_ddp_run_from_the_cli_writes_one_run_folder(odd_folder, tmp_path) -> None:
    """Lightning's ``ddp`` launcher starts a second ``anomalib`` process, whose Engine makes a folder of its own."""
    output = run_anomalib(
        "train", "--model", "anomalib_mvfa.Mvfa", *TINY_CLI, "--model.epochs", "1", "--model.batch_size", "2",
        "--data", "anomalib_mvfa.data.MedicalFolder", "--data.root", odd_folder, "--data.normal_dir", "train/good",
        "--data.abnormal_dir", "test/broken", "--data.normal_test_dir", "test/good",
        "--data.mask_dir", "ground_truth/broken", "--data.num_workers", "0", "--data.seed", "0",
        "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--default_root_dir", tmp_path,
    )  # fmt: skip
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two processes ran
    assert output.count("lightning_model - INFO - Mvfa epoch 1/1: loss") == 1  # the whole batch's line, once
    runs = tmp_path / "Mvfa" / "MedicalFolder"
    assert sorted(path.name for path in runs.iterdir()) == ["latest", "v0"]
    assert (runs / "latest").resolve() == (runs / "v0").resolve()
    for name in ("support_set.json", "weights/mvfa_adapters.pth", "weights/lightning/model.ckpt"):
        assert (runs / "v0" / name).is_file(), name
    split = folder_datamodule(odd_folder)
    split.setup()
    pictures = sorted((runs / "v0" / "images").rglob("*.png"))
    assert len(pictures) == len(split.test_data)  # both processes' test images, in the one folder


class StopAtEpoch(Callback):
    """Every process stops the fit when ``epoch`` (0-based) starts, as a lost node would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            msg = "stopped on purpose"
            raise RuntimeError(msg)


def test_a_resumed_ddp_fit_ends_with_the_adapters_of_an_uninterrupted_one(odd_folder, tmp_path) -> None:
    uninterrupted = Mvfa(**TINY, k_shot=2, epochs=3, batch_size=2)
    engine(tmp_path / "whole", 2, deterministic=True).fit(uninterrupted, datamodule=folder_datamodule(odd_folder))

    interrupted = Mvfa(**TINY, k_shot=2, epochs=3, batch_size=2)
    with pytest.raises(Exception, match="stopped on purpose"):
        engine(tmp_path / "cut", 2, [StopAtEpoch(2)], deterministic=True).fit(
            interrupted, datamodule=folder_datamodule(odd_folder)
        )
    (last,) = (tmp_path / "cut").rglob("last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1  # after two of three epochs

    resumed = Mvfa(**TINY, k_shot=2, epochs=3, batch_size=2)
    engine(tmp_path / "resumed", 2, deterministic=True).fit(
        resumed, datamodule=folder_datamodule(odd_folder), ckpt_path=last
    )
    assert torch.equal(adapters(resumed), adapters(uninterrupted))
    halfway = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(halfway["model.seg_adapters.0.fc1.0.weight"], resumed.model.seg_adapters[0].fc1[0].weight)


def test_bf16_under_two_processes_is_as_far_from_float32_as_bf16_in_one(odd_folder, tmp_path) -> None:
    """bf16 rounds each process's half batch on its own, so DDP cannot equal one process bit for bit.

    What must hold is that DDP adds nothing to bf16's own error: the two-process bf16 adapters are as
    far from the float32 ones as one process's bf16 adapters (0.5 to 1.5 times), measured as the norm
    of the difference over the norm of the float32 training's change.
    """
    trained = {}
    for processes, batch_size, precision in ((1, 4, "32-true"), (1, 4, "bf16-mixed"), (2, 2, "bf16-mixed")):
        model = Mvfa(**TINY, k_shot=2, epochs=2, batch_size=batch_size)
        fitted = engine(tmp_path / f"{processes}{precision}", processes, precision=precision, deterministic=True)
        fitted.fit(model, datamodule=folder_datamodule(odd_folder))
        trained[processes, precision] = adapters(model)
    reference = trained[1, "32-true"]
    change = (reference - adapters(Mvfa(**TINY))).norm()
    one = ((trained[1, "bf16-mixed"] - reference).norm() / change).item()
    two = ((trained[2, "bf16-mixed"] - reference).norm() / change).item()
    assert one > 100 * ADAPTER_TOLERANCE  # bf16 did round (float32 processes agree within 1e-6)
    assert 0.5 * one <= two <= 1.5 * one, (one, two)


def _uneven_loss_process(rank: int, init_file: str, results: str) -> None:
    """One of two gloo processes: the loss of its half of the batch, and the gradient of its logits."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        logits, masks, has_mask, labels = _uneven_batch()
        half = slice(2 * rank, 2 * rank + 2)
        seg_logits = [layer[half].clone().requires_grad_(True) for layer in logits[0]]
        det_logits = [layer[half].clone().requires_grad_(True) for layer in logits[1]]
        criterion = MvfaLoss()
        criterion.distributed = True
        segmentation, detection = criterion(
            TrainingOutputs(seg_logits, det_logits), labels[half], masks[half], has_mask[half]
        )
        (segmentation + detection).backward()
        gradients = [layer.grad for layer in seg_logits + det_logits]
        torch.save(
            {"seg": segmentation.detach(), "det": detection.detach(), "grads": gradients,
             "weight": criterion.last_weight_total},
            f"{results}/rank{rank}.pt",
        )  # fmt: skip
    finally:
        torch.distributed.destroy_process_group()


def _uneven_batch() -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four images: the first process's half has one known mask, the second's two."""
    generator = torch.Generator().manual_seed(0)
    seg = [torch.randn(4, 2, 6, 6, generator=generator) for _ in range(2)]
    det = [torch.randn(4, 9, 2, generator=generator) for _ in range(2)]
    masks = (torch.rand(4, 6, 6, generator=generator) > 0.6).float()
    return (seg, det), masks, torch.tensor([True, False, True, True]), torch.tensor([1.0, 0.0, 1.0, 1.0])


def test_the_loss_of_two_processes_with_uneven_masks_is_the_loss_of_their_whole_batch(tmp_path) -> None:
    """DDP averages the processes' gradients: with the processes' mean total, that is one batch's gradient."""
    torch.multiprocessing.spawn(
        _uneven_loss_process, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )  # fmt: skip
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    (seg, det), masks, has_mask, labels = _uneven_batch()
    seg = [layer.clone().requires_grad_(True) for layer in seg]
    det = [layer.clone().requires_grad_(True) for layer in det]
    # one process, the whole batch, written out here: per-image focal + Dice, mean over the known masks
    target = (masks > 0.5).float()
    per_image = 0
    for layer in seg:
        probability = torch.softmax(layer, dim=1)
        focal = focal_loss(probability, target, reduction="none")
        per_image = per_image + focal + dice_loss(probability[:, 1], target, reduction="none")
    expected_seg = per_image[has_mask].mean()
    expected_det = sum(
        F.binary_cross_entropy_with_logits(torch.softmax(layer, dim=-1)[..., 1].mean(dim=-1), labels) for layer in det
    )
    (expected_seg + expected_det).backward()

    for name, expected in (("seg", expected_seg), ("det", expected_det)):
        averaged = (ranks[0][name] + ranks[1][name]) / 2  # what DDP's gradient average amounts to
        assert averaged.item() == pytest.approx(expected.item(), abs=1e-6), name
    # each process dividing by its own total would weigh its one masked image as much as the other's two
    per_process = (per_image[:2][has_mask[:2]].mean() + per_image[2:][has_mask[2:]].mean()) / 2
    assert abs(per_process.item() - expected_seg.item()) > 1e-3  # so the comparison above can fail
    for rank in range(2):
        half = slice(2 * rank, 2 * rank + 2)
        for mine, whole in zip(ranks[rank]["grads"], [layer.grad for layer in seg + det], strict=True):
            torch.testing.assert_close(mine / 2, whole[half], atol=1e-7, rtol=1e-5)
        assert ranks[rank]["weight"].item() == pytest.approx(has_mask.sum().item() / 2)  # the epoch-mean weight


def test_evaluate_under_ddp_gathers_the_test_scores_before_the_fusions(medical_root, tmp_path) -> None:
    """Two processes of batch 1 against one of batch 2: the same tables, written once."""
    common = [
        "evaluate", "--root", medical_root, "--categories", "Brain", "--k-shot", "2", "--seeds", "0",
        "--epochs", "2", *EVALUATE_TINY, "--feature-pipeline", "clip", "--accelerator", "cpu",
    ]  # fmt: skip
    assert main([*map(str, common), "--train-batch-size", "2", "--output", str(tmp_path / "one")]) == 0
    output = run_anomalib(
        *common, "--train-batch-size", "1", "--strategy", "ddp", "--devices", "2", "--output", tmp_path / "two",
        program=ANOMALIB_MVFA,
    )  # fmt: skip
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output  # two processes ran
    rows = {}
    for name in ("one", "two"):
        with (tmp_path / name / "latest" / "few-shot_2shot_runs.csv").open() as file:
            (rows[name],) = csv.DictReader(file)
    for metric in ("ours_AC", "ours_AS", "authors_AC", "authors_AS"):  # percent
        assert float(rows["two"][metric]) == pytest.approx(float(rows["one"][metric]), abs=1e-4), metric
    table = (tmp_path / "two" / "latest" / "few-shot_2shot.md").read_text()
    assert output.count(table.splitlines()[0]) == 1  # printed by the first process only
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == ["latest", "v0"]  # one run folder for all
    assert sorted(path.name for path in (tmp_path / "two" / "v0").iterdir()) == sorted(
        path.name for path in (tmp_path / "one" / "v0").iterdir()
    )
