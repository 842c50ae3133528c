"""The optimised training loop gives the same adapters as the authors' way of training."""

from __future__ import annotations

import copy
import re

from anomalib_mvfa import Mvfa
from anomalib_mvfa.commands import main
from anomalib_mvfa.commands.speed import max_adapter_difference, train_reference
from anomalib_mvfa.support import SupportDataset

from .test_lightning import TINY_MODEL, engine, mvtec

TOLERANCE = 1e-5


def test_lightning_fit_equals_the_reference_loop_after_two_epochs(tmp_path, mvtec_root, monkeypatch) -> None:
    check_fit_equals_the_reference_loop(Mvfa(**TINY_MODEL, epochs=2), tmp_path, mvtec_root, monkeypatch)


def check_fit_equals_the_reference_loop(model: Mvfa, tmp_path, mvtec_root, monkeypatch) -> None:
    """The prefix cache and early stop of a Lightning fit give the adapters of the authors' full loop (1e-5)."""
    assert model.cache_prefix
    reference = copy.deepcopy(model.model)
    initial = copy.deepcopy(model.model)
    served: list[int] = []
    datasets: list[SupportDataset] = []
    original = SupportDataset.__getitem__

    def recording_getitem(self: SupportDataset, index: int) -> tuple:
        served.append(index)
        datasets.append(self)
        return original(self, index)

    monkeypatch.setattr(SupportDataset, "__getitem__", recording_getitem)
    engine(tmp_path).fit(model, datamodule=mvtec(mvtec_root))

    dataset = datasets[0]
    assert len(served) == 2 * len(dataset)
    orders = [served[: len(dataset)], served[len(dataset) :]]
    reference.text_features = model.model.text_features.clone()
    images = model.preprocess(dataset.images)
    train_reference(reference, images, dataset.labels.float(), dataset.masks, orders, learning_rate=1e-3)
    assert max_adapter_difference(reference, model.model) <= TOLERANCE
    assert max_adapter_difference(initial, model.model) > 1e-3  # training moved the adapters: the check can fail


def test_speed_command_prints_its_figures(capsys) -> None:
    code = main([
        "speed", "--backbone", "tiny-random", "--image-size", "64", "--k-shot", "1",
        "--search-k-shot", "2", "--epochs", "2", "--repeats", "1", "--memory-bank-ratio", "0.1",
    ])  # fmt: skip
    output = capsys.readouterr().out
    assert code == 0
    assert len(re.findall(r"epoch \d: reference [\d.]+ s, optimised [\d.]+ s, speed-up [\d.]+x", output)) == 2
    difference = float(re.search(r"largest adapter weight difference after training: (\S+)", output).group(1))
    assert difference <= TOLERANCE
    for precision in ("float32", "bfloat16"):
        assert re.search(rf"MVFA scoring at K=1, {precision} search: [\d.]+ s, overhead -?\d+%", output)
    tokens = int(re.search(r"nearest-neighbour search at K=2 \((\d+) tokens a layer\)", output).group(1))
    assert tokens == 2 * 11 * (64 // 16) ** 2  # K images x 11 augmentations x patches of the tiny backbone
    assert re.search(r"exact, float32: [\d.]+ s, \d+%", output)
    recalls = re.findall(r"recall of the exact nearest neighbour ([\d.]+)%, distance increase mean (\S+), max", output)
    assert len(recalls) == 3  # bfloat16 on the whole bank, the coreset in both precisions
    for recall, increase in recalls:
        assert 0.0 <= float(recall) <= 100.0
        assert float(increase) >= -1e-6
    assert re.search(rf"coreset 0.1 \({int(tokens * 0.1)} tokens a layer", output)


def test_loading_command_prints_its_figures(capsys) -> None:
    argv = ["loading", "--backbone", "tiny-random", "--image-size", "64", "--files", "4", "--side", "64"]
    assert main([*argv, "--volume-side", "16", "--batch-size", "2", "--workers", "0"]) == 0
    output = capsys.readouterr().out
    for pattern in (
        r"DICOM: \d+\.\d ms per image",
        r"16-bit PNG: \d+\.\d ms per image",
        r"NIfTI: first slice \d+ ms .* then \d+\.\d+ ms a slice",
        r"model alone \d+\.\d; DICOM loader alone \d+\.\d; together \d+\.\d",
        r"loading is (not )?the bottleneck",
    ):
        assert re.search(pattern, output), (pattern, output)


def test_scaling_command_measures_one_process_against_two(capsys) -> None:
    argv = ["scaling", "--backbone", "tiny-random", "--image-size", "64", "--k-shot", "2", "--epochs", "1"]
    assert main([*argv, "--batch-size", "4", "--processes", "2"]) == 0
    output = capsys.readouterr().out
    for pattern in (
        r"1 process\(es\) x \d+ threads: training \d+\.\d samples/s, test \d+\.\d images/s",
        r"2 process\(es\) x \d+ threads: training \d+\.\d samples/s, test \d+\.\d images/s",
        r"2 processes against 1: training \d+\.\d\dx, test \d+\.\d\dx",
    ):
        assert re.search(pattern, output), (pattern, output)
