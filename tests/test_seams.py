"""The seams between the model, the few-shot callback, the support code and the commands."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import PredictDataset
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader

from anomalib_mvfa import Mvfa, MvfaLoss, TrainingOutputs
from anomalib_mvfa.commands import console
from anomalib_mvfa.commands.evaluate import score_test_split
from anomalib_mvfa.data import MedicalAD
from anomalib_mvfa.loss import dice_loss, focal_loss

from .conftest import TINY_IMAGE_SIZE, cpu_engine, folder_datamodule, write_dataset

PACKAGE = Path(__file__).parents[1] / "anomalib_mvfa"
TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}


class WatchDatamodule(Callback):
    """Records, at every training batch, whether the datamodule's training loader is its own."""

    def __init__(self) -> None:
        self.own_loader: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        datamodule = trainer.datamodule
        self.own_loader.append(
            "train_dataloader" not in vars(datamodule)
            and datamodule.train_dataloader.__func__ is type(datamodule).train_dataloader
        )


class FailAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        msg = "stop here"
        raise RuntimeError(msg)


def test_a_fit_leaves_the_datamodule_as_it_was_even_when_it_raises(tmp_path) -> None:
    datamodule = folder_datamodule(write_dataset(tmp_path / "data", "folder"))
    watch = WatchDatamodule()
    model = Mvfa(**TINY, k_shot=2, epochs=2)
    with pytest.raises(RuntimeError, match="stop here"):
        cpu_engine(tmp_path / "run", [watch, FailAfterFirstEpoch()]).fit(model, datamodule=datamodule)
    assert watch.own_loader  # the fit ran batches
    assert all(watch.own_loader)  # during the fit the datamodule kept its own training loader
    assert "train_dataloader" not in vars(datamodule)
    loader = datamodule.train_dataloader()
    assert loader.dataset is datamodule.train_data  # anomalib's training split, not the support set
    assert len(loader.dataset) == 8


def test_a_checkpoint_tests_and_predicts_after_its_training_folders_are_deleted(tmp_path) -> None:
    data_root = write_dataset(tmp_path / "data", "folder")
    # training-only inputs: a folder of normal support images, one of abnormal ones (with masks)
    normal, abnormal = tmp_path / "normal", tmp_path / "abnormal"
    shutil.copytree(data_root / "train" / "good", normal)
    shutil.copytree(data_root / "test" / "broken", abnormal)
    shutil.copytree(data_root / "ground_truth" / "broken", abnormal / "masks")
    adapters = Mvfa(**TINY, epochs=0).model.save_adapters(tmp_path / "start" / "adapters.pth")
    model = Mvfa(
        **TINY,
        k_shot=2,
        epochs=1,
        few_shot_source=str(normal),
        abnormal_source=str(abnormal),
        adapter_checkpoint=str(adapters),
    )
    cpu_engine(tmp_path / "run").fit(model, datamodule=folder_datamodule(data_root))
    (checkpoint,) = (tmp_path / "run").rglob("model.ckpt")
    kept = tmp_path / "kept"
    shutil.copytree(data_root / "test", kept)  # images to predict on, outside the deleted folders
    for path in (data_root, normal, abnormal, adapters.parent):
        shutil.rmtree(path)

    loaded = Mvfa.load_from_checkpoint(checkpoint, weights_only=True)
    dataset = PredictDataset(kept / "broken", image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    loader = DataLoader(dataset, batch_size=3, collate_fn=dataset.collate_fn)
    predictions = cpu_engine(tmp_path / "predict").predict(loaded, dataloaders=loader)
    scores = torch.cat([batch.pred_score for batch in predictions])
    images = torch.cat([batch.image for batch in predictions])
    model.eval()
    with torch.no_grad():
        expected = model.model(model.preprocess(images)).pred_score
    assert scores.shape == (6,)
    assert torch.isfinite(scores).all()
    # raw scores of the reloaded model equal those of the trained one (anomalib normalises predictions)
    with torch.no_grad():
        reloaded = loaded.eval().model(loaded.preprocess(images)).pred_score
    assert torch.allclose(reloaded, expected, atol=1e-5)

    # as `anomalib predict --config ... --ckpt_path`: a model built with the deleted paths, then restored
    rebuilt = Mvfa(
        **TINY, k_shot=2, epochs=1, few_shot_source=str(normal), abnormal_source=str(abnormal),
        adapter_checkpoint=str(adapters),
    )  # fmt: skip
    again = cpu_engine(tmp_path / "predict-ckpt").predict(rebuilt, dataloaders=loader, ckpt_path=checkpoint)
    assert torch.allclose(torch.cat([batch.pred_score for batch in again]), scores, atol=1e-5)


def test_evaluation_scores_without_changing_the_test_dataset(medical_root, tmp_path) -> None:
    datamodule = MedicalAD(root=medical_root, category="Brain", num_workers=0, eval_batch_size=4)
    datamodule.setup()
    test_data = datamodule.test_data
    augmentations, samples = test_data.augmentations, test_data.samples.copy()
    model = Mvfa(**TINY, k_shot=0, epochs=0, class_name="brain")
    model.setup()
    scores = score_test_split(model, datamodule, batch_size=4)
    assert datamodule.test_data is test_data
    assert test_data.augmentations is augmentations
    assert test_data.samples.equals(samples)
    assert scores.score.shape == (len(samples),)
    assert scores.anomaly_map.shape == (len(samples), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


class RecordOperations(TorchDispatchMode):
    """Records the aten operations that run, with whether any argument is a boolean tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        flat += [item for arg in args if isinstance(arg, list | tuple) for item in arg]
        boolean = any(isinstance(arg, torch.Tensor) and arg.dtype == torch.bool for arg in flat)
        self.operations.append((str(func.overloadpacket), boolean))
        return func(*args, **(kwargs or {}))


# operations that read a value back from the device, or whose output size depends on values
SYNCHRONISING = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item"}


def test_the_loss_reads_nothing_back_and_weighs_samples_without_masks_out() -> None:
    generator = torch.Generator().manual_seed(0)
    seg = [torch.randn(4, 2, 8, 8, generator=generator, requires_grad=True) for _ in range(2)]
    det = [torch.randn(4, 5, 2, generator=generator, requires_grad=True) for _ in range(2)]
    labels = torch.tensor([0, 1, 1, 0])
    masks = (torch.rand(4, 8, 8, generator=generator) > 0.7).float()
    has_mask = torch.tensor([True, False, True, True])
    criterion = MvfaLoss(detection_loss="bce")

    recorder = RecordOperations()
    with recorder:
        seg_loss, det_loss = criterion(TrainingOutputs(seg, det), labels, masks, has_mask)
        (seg_loss + det_loss).backward()
    names = {name for name, _ in recorder.operations}
    assert not names & SYNCHRONISING, names & SYNCHRONISING
    assert not [name for name, boolean in recorder.operations if boolean and name.startswith("aten.index")]

    # independent computation: the segmentation loss over the images that have masks only
    keep = [0, 2, 3]
    expected = sum(
        focal_loss(torch.softmax(layer[keep], dim=1), masks[keep])
        + dice_loss(torch.softmax(layer[keep], dim=1)[:, 1], masks[keep])
        for layer in seg
    )
    assert torch.allclose(seg_loss, expected, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    none = criterion(TrainingOutputs(seg, det), labels, masks, torch.zeros(4, dtype=torch.bool))[0]
    assert none.item() == 0.0  # no image with a mask: no segmentation signal


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_support_code_does_not_import_the_lightning_module_or_the_commands() -> None:
    support = sorted((PACKAGE / "support").glob("*.py"))
    assert len(support) >= 4  # selection, augmentation, datasets, callback
    for path in support:
        imported = _imports(path)
        assert not [name for name in imported if "lightning_model" in name or "commands" in name], path
    for path in sorted(set(PACKAGE.glob("*.py")) - {PACKAGE / "__main__.py"}):  # model code: not the commands
        assert not [name for name in _imports(path) if "commands" in name], path


def test_the_command_help_loads_neither_torch_nor_anomalib() -> None:
    code = (
        "import sys\n"
        "from anomalib_mvfa.commands import console\n"
        "try:\n    console(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'anomalib', 'lightning', 'open_clip') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "benchmark" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_configs_command_copies_the_shipped_configs_and_overwrites_nothing(tmp_path, capsys) -> None:
    repository = Path(__file__).parents[1] / "configs"
    shipped = sorted(path.relative_to(repository) for path in repository.rglob("*.yaml"))
    assert console(["configs", "--dest", str(tmp_path)]) == 0
    copied = sorted(path.relative_to(tmp_path / "configs") for path in (tmp_path / "configs").rglob("*.yaml"))
    assert copied == shipped
    for name in shipped:
        assert (tmp_path / "configs" / name).read_bytes() == (repository / name).read_bytes()
    edited = tmp_path / "configs" / shipped[0]
    edited.write_text("mine")
    capsys.readouterr()
    assert console(["configs", "--dest", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert edited.read_text() == "mine"
    assert console(["configs", "--dest", str(tmp_path), "--force"]) == 0
    assert edited.read_bytes() == (repository / shipped[0]).read_bytes()


def _eval_mode_warnings(model: Mvfa, root: Path) -> list[str]:
    datamodule = folder_datamodule(write_dataset(root / "data", "folder"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu_engine(root / "run").fit(model, datamodule=datamodule)
    messages = [str(warning.message) for warning in caught]
    return [message for message in messages if "in eval mode at the start of training" in message]


def test_lightning_warns_of_eval_mode_modules_other_than_the_frozen_clip_only(tmp_path) -> None:
    assert _eval_mode_warnings(Mvfa(**TINY, k_shot=2, epochs=1), tmp_path / "clip") == []
    model = Mvfa(**TINY, k_shot=2, epochs=1)
    model.loss.eval()  # a module outside CLIP left in eval mode is still reported
    assert len(_eval_mode_warnings(model, tmp_path / "other")) == 1
