"""Catalogue of bad inputs: each raises a clear error naming the input, or is handled correctly.

``CASES`` maps a case name to a function that makes the bad input in a fresh folder and passes it
on, and to the pattern its error message must match. ``python -m tests.test_bad_inputs`` prints
every case with the message a user sees.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pydicom
import pytest
import torch
from anomalib.engine import Engine
from PIL import Image
from pydicom.data import get_testdata_file

from anomalib_mvfa import Mvfa, MvfaModel
from anomalib_mvfa.backbone import PretrainedWeightsError, load_clip, resolve_model_config
from anomalib_mvfa.commands import console
from anomalib_mvfa.commands.benchmark import BenchmarkConfig
from anomalib_mvfa.data import MedicalAD, ScanReader
from anomalib_mvfa.data import read_image as read_image_file
from anomalib_mvfa.data import read_mask as read_mask_file
from anomalib_mvfa.support import draw_from_folder, resize_image

from .conftest import TINY_IMAGE_SIZE, save_checkpoint_file, write_medical_category
from .test_archives import archive_file, honest_entries, pickled_tensor
from .test_checks import EIGHT_BIT, image_batches
from .test_hostile_configs_and_names import benchmark_config
from .test_weight_files import archive_that_runs_code, deflated_copy, torch_file

TINY = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}


def tiny_model(**overrides: object) -> MvfaModel:
    return MvfaModel(**{**TINY, **overrides})


def medical(tmp: Path, category: str = "Brain", masks: bool = True) -> Path:
    write_medical_category(tmp / "MVFA", category, masks=masks)
    return tmp / "MVFA"


def fit_on_medical(root: Path, tmp: Path, k_shot: int, abnormal_source: str = "auto") -> None:
    model = Mvfa(**TINY, k_shot=k_shot, epochs=1, abnormal_source=abnormal_source)
    engine = Engine(default_root_dir=tmp / "results", accelerator="cpu", devices=1, logger=False)
    engine.fit(model, datamodule=MedicalAD(root=root, category="Brain", num_workers=0, eval_batch_size=4))


# ----------------------------------------------------------------------------- data


def root_missing(tmp: Path) -> None:
    MedicalAD(root=tmp / "no-such-root", category="Brain").setup()


def split_empty(tmp: Path) -> None:
    root = medical(tmp)
    for folder in (root / "Brain_AD" / "test").rglob("img"):
        shutil.rmtree(folder)
        folder.mkdir()
    MedicalAD(root=root, category="Brain").setup()


def too_few_normal(tmp: Path) -> None:
    fit_on_medical(medical(tmp), tmp, k_shot=8)  # the valid split holds 6 normal images


def too_few_abnormal(tmp: Path) -> None:
    root = medical(tmp)
    for path in sorted((root / "Brain_AD" / "valid" / "Ungood" / "img").iterdir())[:3]:
        path.unlink()  # 3 abnormal images are left, 6 normal ones
    fit_on_medical(root, tmp, k_shot=4, abnormal_source="train")  # "auto" would synthesise them


def undecodable_image(tmp: Path) -> None:
    root = medical(tmp)
    (root / "Brain_AD" / "test" / "good" / "img" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    datamodule = MedicalAD(root=root, category="Brain")
    datamodule.setup()
    samples = datamodule.test_data.samples
    datamodule.test_data[samples.index[samples.image_path.str.endswith("zz_truncated.png")][0]]


def undecodable_support_image(tmp: Path) -> None:
    folder = tmp / "abnormal"
    folder.mkdir()
    (folder / "scan.png").write_bytes(b"not an image")
    draw_from_folder(folder, k=1, seed=0, image_size=TINY_IMAGE_SIZE, label=1)


def mask_size_differs(tmp: Path) -> None:
    root = medical(tmp)
    mask_folder = root / "Brain_AD" / "test" / "Ungood" / "anomaly_mask"
    first = sorted(mask_folder.iterdir())[0]
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(first, format="PNG")
    datamodule = MedicalAD(root=root, category="Brain")
    datamodule.setup()
    position = datamodule.test_data.samples.index[datamodule.test_data.samples.mask_path == str(first)][0]
    datamodule.test_data[position]


def support_mask_size_differs(tmp: Path) -> None:
    folder = tmp / "abnormal"
    (folder / "masks").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "scan.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "masks" / "scan.png")
    draw_from_folder(folder, k=1, seed=0, image_size=TINY_IMAGE_SIZE, label=1)


def masks_missing(tmp: Path) -> None:
    root = medical(tmp)
    sorted((root / "Brain_AD" / "valid" / "Ungood" / "anomaly_mask").iterdir())[1].unlink()
    MedicalAD(root=root, category="Brain").setup()


# --------------------------------------------------------------------------- tensors


def non_finite_input(tmp: Path) -> None:
    del tmp
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    images[1, 0, 3, 3] = float("nan")
    images[1, 2, 5, 5] = float("inf")
    model = tiny_model()
    model.setup("scan")
    model.eval()(images)


def mixed_image_sizes(tmp: Path) -> None:
    del tmp
    model = tiny_model()
    model.setup("scan")
    model.eval()([torch.rand(3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), torch.rand(3, 32, 48)])


# ----------------------------------------------------------------------- checkpoints


def adapters_of_another_width(tmp: Path) -> None:
    wide = tiny_model()
    wide.seg_adapters[0].fc1[0].weight.data = torch.zeros(32, 64)
    wide.save_adapters(tmp / "wide.pth")
    tiny_model().load_adapters(tmp / "wide.pth")


def _scored(images: torch.Tensor) -> None:
    model = tiny_model()
    model.setup("scan")
    model.eval()(images)


def empty_batch(tmp: Path) -> None:
    del tmp
    _scored(torch.rand(0, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))


def meta_device_batch(tmp: Path) -> None:
    del tmp
    _scored(torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, device="meta"))


def integer_batch(tmp: Path) -> None:
    del tmp
    _scored(torch.randint(0, 256, (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), dtype=torch.uint8))


def adapters_with_nan(tmp: Path) -> None:
    diverged = tiny_model()
    diverged.det_adapters[1].fc2[0].weight.data[0, :3] = float("nan")
    diverged.save_adapters(tmp / "diverged.pth")
    tiny_model().load_adapters(tmp / "diverged.pth")


def checkpoint_of_other_clip_weights(tmp: Path) -> None:
    config = resolve_model_config("tiny-random")[1]
    for seed in (1, 2):
        torch.manual_seed(seed)
        torch.save(open_clip.CLIP(**config).state_dict(), tmp / f"clip{seed}.pt")
    model = Mvfa(**{**TINY, "pretrained": str(tmp / "clip1.pt")}, epochs=0, k_shot=0, class_name="scan")
    save_checkpoint_file(model, tmp / "model.pt")  # not *.ckpt: the catalogue checks that no run left a .ckpt
    Mvfa.load_from_checkpoint(tmp / "model.pt", pretrained=str(tmp / "clip2.pt"))


def adapters_of_another_layer_count(tmp: Path) -> None:
    tiny_model(feature_layers=(2, 4)).save_adapters(tmp / "two_layers.pth")
    tiny_model().load_adapters(tmp / "two_layers.pth")


def not_a_checkpoint(tmp: Path) -> None:
    (tmp / "notes.pth").write_text("these are notes, not weights")
    tiny_model().load_adapters(tmp / "notes.pth")


class _WritesAFile:
    """A pickle payload that would create ``pwned`` next to the checkpoint when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.target, "code ran"))


def pickle_that_runs_code(tmp: Path) -> None:
    payload = {"seg_adapters": _WritesAFile(tmp / "pwned"), "det_adapters": {}}
    torch.save(payload, tmp / "evil.pth", pickle_protocol=4)  # torch's own file format, code inside
    try:
        tiny_model().load_adapters(tmp / "evil.pth")
    finally:
        assert not (tmp / "pwned").exists(), "the pickle ran code"


def plain_pickle_that_runs_code(tmp: Path) -> None:
    with (tmp / "evil.pth").open("wb") as file:
        pickle.dump({"seg_adapters": _WritesAFile(tmp / "pwned"), "det_adapters": {}}, file)
    try:
        tiny_model().load_adapters(tmp / "evil.pth")
    finally:
        assert not (tmp / "pwned").exists(), "the pickle ran code"


def weights_that_run_code(tmp: Path) -> None:
    torch.save({"visual.proj": _WritesAFile(tmp / "pwned")}, tmp / "evil_weights.pt", pickle_protocol=4)
    try:
        load_clip("tiny-random", tmp / "evil_weights.pt", TINY_IMAGE_SIZE)
    finally:
        assert not (tmp / "pwned").exists(), "the pickle ran code"


def bad_test_files_before_training(tmp: Path) -> None:
    root = medical(tmp)
    test = root / "Brain_AD" / "test"
    (test / "good" / "img" / "zz_empty.png").write_bytes(b"")
    (test / "good" / "img" / "zz_garbage.png").write_bytes(b"not an image")
    mask = next((test / "Ungood" / "anomaly_mask").iterdir())
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(mask, format="PNG")
    fit_on_medical(root, tmp, k_shot=2)


def broken_scans_before_training(tmp: Path) -> None:
    """DICOM files that decode only partly or not at all: found by the check before the fit trains."""
    root = medical(tmp)
    folder = root / "Brain_AD" / "test" / "good" / "img"
    lying = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    lying.NumberOfFrames = 3  # one frame of data
    lying.save_as(folder / "zz_frames.dcm")
    flat = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    flat.WindowCenter, flat.WindowWidth, flat.VOILUTFunction = 40, 0, "SIGMOID"
    flat.save_as(folder / "zz_sigmoid.dcm")
    fit_on_medical(root, tmp, k_shot=2)


def masks_all_empty(tmp: Path) -> None:
    root = medical(tmp)
    for mask in (root / "Brain_AD" / "test" / "Ungood" / "anomaly_mask").iterdir():
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(mask, format="PNG")  # the annotation is lost
    MedicalAD(root=root, category="Brain").setup()


def label_folder_in_two_cases(tmp: Path) -> None:
    root = medical(tmp)
    shutil.copytree(root / "Brain_AD" / "test" / "Ungood", root / "Brain_AD" / "test" / "ungood")
    MedicalAD(root=root, category="Brain").setup()


def _fit_with_seed_file(tmp: Path, lines: str, k_shot: int) -> None:
    root = medical(tmp)
    (tmp / "seeds.txt").write_text(lines)
    model = Mvfa(**TINY, k_shot=k_shot, epochs=1, abnormal_source="train")
    engine = Engine(default_root_dir=tmp / "results", accelerator="cpu", devices=1, logger=False)
    datamodule = MedicalAD(root=root, category="Brain", num_workers=0, seed_file=tmp / "seeds.txt")
    engine.fit(model, datamodule=datamodule)


def seed_line_shorter_than_k_shot(tmp: Path) -> None:
    normal = "valid_good_0.png valid_good_1.JPEG valid_good_2.png"
    _fit_with_seed_file(tmp, f"n-0: {normal}\na-0: valid_Ungood_0.png valid_Ungood_1.JPEG\n", k_shot=3)


def seed_file_without_normal_line(tmp: Path) -> None:
    _fit_with_seed_file(tmp, "a-0: valid_Ungood_0.png valid_Ungood_1.JPEG\n", k_shot=2)


def seed_line_naming_a_file_twice(tmp: Path) -> None:
    normal = "valid_good_0.png valid_good_0.png"
    _fit_with_seed_file(tmp, f"n-0: {normal}\na-0: valid_Ungood_0.png valid_Ungood_1.JPEG\n", k_shot=2)


def torchscript_weights_that_run_code(tmp: Path) -> None:
    archive, marker = archive_that_runs_code(tmp)
    try:
        load_clip("tiny-random", archive, TINY_IMAGE_SIZE)
    finally:
        assert not marker.exists(), "the archive's code ran"


def compressed_weights(tmp: Path) -> None:
    torch.save({"visual.proj": torch.zeros(4 * 2**20)}, tmp / "plain.pt")
    load_clip("tiny-random", deflated_copy(tmp / "plain.pt", tmp / "bomb.pt"), TINY_IMAGE_SIZE)


def weights_declaring_more_than_they_hold(tmp: Path) -> None:
    load_clip("tiny-random", torch_file(tmp / "liar.pt", declared_numel=2**32, held_bytes=16), TINY_IMAGE_SIZE)


def weights_larger_than_the_backbone(tmp: Path) -> None:
    numel = 10 * 2**20
    load_clip("tiny-random", torch_file(tmp / "huge.pt", numel, held_bytes=4 * numel), TINY_IMAGE_SIZE)


def weights_with_an_entry_name_cut_at_nul(tmp: Path) -> None:
    entries = [*honest_entries()[:2], ("w/data/0", bytes(2**20)), ("w/data/0Zx", bytes(4)), honest_entries()[3]]
    path = archive_file(tmp / "nul.pt", entries, renames={"w/data/0Zx": b"w/data/0\x00x"}, deflated=("w/data/0",))
    load_clip("tiny-random", path, TINY_IMAGE_SIZE)


def adapters_with_entries_named_alike(tmp: Path) -> None:
    entries = [*honest_entries()[:2], ("w/DATA/0", bytes(4)), *honest_entries()[2:]]
    tiny_model().load_adapters(archive_file(tmp / "case.pth", entries))


def weights_with_a_compressed_byteorder(tmp: Path) -> None:
    path = archive_file(tmp / "byteorder.pt", honest_entries(), deflated=("w/byteorder",))
    load_clip("tiny-random", path, TINY_IMAGE_SIZE)


def weights_with_a_tensor_view_beyond_its_storage(tmp: Path) -> None:
    view = pickled_tensor(4, offset=2, size=(4,), stride=(1,))
    path = archive_file(tmp / "view.pt", [("w/data.pkl", view), ("w/data/0", bytes(16)), honest_entries()[3]])
    load_clip("tiny-random", path, TINY_IMAGE_SIZE)


def eight_bit_batch_through_the_engine(tmp: Path) -> None:
    model = Mvfa(**TINY, k_shot=0, epochs=0, class_name="scan", visualizer=False)
    Engine(default_root_dir=tmp, accelerator="cpu", devices=1, logger=False).predict(
        model, dataloaders=image_batches(EIGHT_BIT)
    )


def negative_learning_rate(tmp: Path) -> None:
    del tmp
    Mvfa(**TINY, det_learning_rate=-1e-3)


def benchmark_config_naming_os_system(tmp: Path) -> None:
    BenchmarkConfig.from_file(benchmark_config(tmp, "os.system"))
    assert not (tmp / "marker").exists(), "the config ran a command"


# --------------------------------------------------------------------------- settings


def unknown_backbone(tmp: Path) -> None:
    del tmp
    MvfaModel("ViT-L-14-363", pretrained=None)


def pretrained_tag_offline(tmp: Path) -> None:
    load_clip("ViT-B-16", "openai", 224, cache_dir=str(tmp / "cache"))


def feature_layer_too_deep(tmp: Path) -> None:
    del tmp
    tiny_model(feature_layers=(2, 5))


def feature_layer_repeated(tmp: Path) -> None:
    del tmp
    tiny_model(feature_layers=(2, 2, 4))


def image_size_below_one_patch(tmp: Path) -> None:
    del tmp
    tiny_model(image_size=8)


def empty_class_name(tmp: Path) -> None:
    del tmp
    Mvfa(**TINY, class_name="  ")


def empty_class_name_torch_model(tmp: Path) -> None:
    del tmp
    tiny_model().setup(class_name="")


def unsupported_export_type(tmp: Path) -> None:
    Engine(default_root_dir=tmp, logger=False).export(Mvfa(**TINY, epochs=0), export_type="tensorrt")


# name: (function, exception type, pattern of the message)
CASES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    "dataset root missing": (root_missing, ValueError, r"Dataset root '.*no-such-root' does not exist: expected"),
    "split folder empty": (split_empty, ValueError, r"Split '.*Brain_AD/test' holds no image: expected images in"),
    "fewer normal images than k_shot": (too_few_normal, ValueError, r"holds 6 normal image\(s\); k_shot=8 needs"),
    "fewer abnormal images than k_shot": (too_few_abnormal, ValueError, r"holds 3 abnormal image\(s\); k_shot=4"),
    "image that cannot be decoded": (undecodable_image, ValueError, r"Image '.*zz_truncated\.png' cannot be decoded"),
    "support image that cannot be decoded": (undecodable_support_image, ValueError, r"'.*scan\.png' cannot be decoded"),
    "mask size differs from its image": (
        mask_size_differs,
        ValueError,
        r"Mask '.*' is \(20, 30\) pixels but its image",
    ),
    "support mask size differs": (support_mask_size_differs, ValueError, r"masks/scan\.png' is \(16, 16\) pixels"),
    "masks missing in a segmentation category": (
        masks_missing,
        ValueError,
        r"1 of the 6 abnormal images in '.*valid/Ungood/img' have no mask.*expected for example '.*anomaly_mask/",
    ),
    "NaN or infinite input values": (
        non_finite_input,
        ValueError,
        r"images contain 2 NaN or infinite value\(s\).*image 1",
    ),
    "batch of mixed image sizes": (
        mixed_image_sizes,
        ValueError,
        r"images is a list of 2 tensors of shapes \[\(3, 64, 64\), \(3, 32, 48\)\]: resize every image to 64 x 64",
    ),
    "bad files of the test split, found when the fit starts": (
        bad_test_files_before_training,
        ValueError,
        r"3 file problem\(s\) in the splits this run uses, found before it started: "
        r"test: Mask '.*anomaly_mask/.*' is \(20, 30\) pixels but its image '.*' is \(48, 48\); "
        r"test: '.*zz_empty\.png' is empty \(0 bytes\); test: '.*zz_garbage\.png' cannot be decoded",
    ),
    "DICOM files that fail after training, found when the fit starts": (
        broken_scans_before_training,
        ValueError,
        r"2 file problem\(s\) in the splits this run uses, found before it started: "
        r"test: DICOM '.*zz_frames\.dcm' declares 3 frame\(s\) of 128 x 128 pixels x 1 sample\(s\) x 16 bits = "
        r"98304 bytes of pixel data but holds 32768: the file is truncated or its header is wrong; "
        r"test: DICOM '.*zz_sigmoid\.dcm' has window width 0 with VOI LUT function SIGMOID",
    ),
    "every mask of a folder empty": (
        masks_all_empty,
        ValueError,
        r"Every one of the 6 masks of abnormal images in '.*test/Ungood/anomaly_mask' is empty",
    ),
    "label folder in two letter cases": (
        label_folder_in_two_cases,
        ValueError,
        r"'.*Brain_AD/test' holds 2 folders named 'Ungood' in different letter cases: \['Ungood', 'ungood'\]",
    ),
    "seed-file line with fewer files than k_shot": (
        seed_line_shorter_than_k_shot,
        ValueError,
        r"Seed file '.*seeds\.txt', line 2 \('a-0'\) names 2 file\(s\); k_shot=3 needs 3",
    ),
    "seed-file line naming a file twice": (
        seed_line_naming_a_file_twice,
        ValueError,
        r"Seed file '.*seeds\.txt', line 1 \('n-0'\) names 'valid_good_0\.png' 2 times: each support image must "
        r"be a different file\.",
    ),
    "seed file without a normal line": (
        seed_file_without_normal_line,
        ValueError,
        r"Seed file '.*seeds\.txt' has no 'n-0' line for the normal support images",
    ),
    "empty batch": (empty_batch, ValueError, r"images is an empty batch \(shape \(0, 3, 64, 64\)\)"),
    "batch on the meta device": (meta_device_batch, ValueError, r"images is on the 'meta' device"),
    "integer batch": (integer_batch, ValueError, r"images has dtype torch.uint8.*divide by 255"),
    "adapters holding NaN": (
        adapters_with_nan,
        ValueError,
        r"diverged\.pth' holds 3 NaN or infinite value\(s\) in 'det_adapters' '1\.fc2\.0\.weight'",
    ),
    "checkpoint of other CLIP weights": (
        checkpoint_of_other_clip_weights,
        ValueError,
        r"trained on the CLIP weights '.*clip1\.pt' \(fingerprint \w+\), but this model loaded "
        r"pretrained='.*clip2\.pt' \(fingerprint \w+\)",
    ),
    "adapters of another backbone width": (adapters_of_another_width, ValueError, r"wide\.pth.*\(32, 64\).*\(32, 48\)"),
    "adapters of another layer count": (
        adapters_of_another_layer_count,
        ValueError,
        r"two_layers\.pth.*2 layer\(s\).*expects 3 layer\(s\)",
    ),
    "file that is not a checkpoint": (not_a_checkpoint, ValueError, r"notes\.pth' is not a file written by torch"),
    "pickle that would run code": (
        pickle_that_runs_code,
        ValueError,
        r"evil\.pth' was refused: it holds Python objects other than tensors.*write_text.*could run code",
    ),
    "plain pickle that would run code": (
        plain_pickle_that_runs_code,
        ValueError,
        r"evil\.pth' is not a file written by torch.save \(not a zip archive",
    ),
    "weights file that would run code": (
        weights_that_run_code,
        PretrainedWeightsError,
        r"Weights file '.*evil_weights\.pt' was refused: .*could run code",
    ),
    "TorchScript weights whose code writes a file when loaded": (
        torchscript_weights_that_run_code,
        PretrainedWeightsError,
        r"Weights '.*ViT-B-16\.pt' do not fit backbone 'tiny-random': \d+ missing keys",
    ),
    "compressed weights (a decompression bomb)": (
        compressed_weights,
        PretrainedWeightsError,
        r"bomb\.pt' was refused: 7 of its 7 entries are compressed",
    ),
    "weights declaring more bytes than they hold": (
        weights_declaring_more_than_they_hold,
        PretrainedWeightsError,
        r"liar\.pt' was refused: it declares 17179869184 bytes for tensor storage '0' but holds 16",
    ),
    "weights entry named alike after a NUL byte": (
        weights_with_an_entry_name_cut_at_nul,
        PretrainedWeightsError,
        r"nul\.pt' was refused: its entry name 'w/data/0\\x00x' holds a NUL byte, where Python's zipfile ends",
    ),
    "adapter entries named alike in another letter case": (
        adapters_with_entries_named_alike,
        ValueError,
        r"case\.pth' was refused: it holds two entries named alike \('w/DATA/0' and 'w/data/0'; torch's reader",
    ),
    "compressed byteorder entry": (
        weights_with_a_compressed_byteorder,
        PretrainedWeightsError,
        r"byteorder\.pt' was refused: 1 of its 4 entries are compressed \(for example 'w/byteorder'\)",
    ),
    "tensor view beyond its storage": (
        weights_with_a_tensor_view_beyond_its_storage,
        PretrainedWeightsError,
        r"view\.pt' was refused: it holds a tensor record that is not valid \(offset 2, size \(4,\), stride "
        r"\(1,\) reaches beyond the 4 element\(s\) of its storage\)",
    ),
    "8-bit batch through the Engine": (
        eight_bit_batch_through_the_engine,
        ValueError,
        r"images of the batch hold values from \d+ to 255; Mvfa takes images in \[0, 1\]",
    ),
    "negative learning rate": (
        negative_learning_rate,
        ValueError,
        r"det_learning_rate must be a finite number >= 0 \(0 leaves the detection adapters as they are\), got -0\.001",
    ),
    "benchmark config naming os.system": (
        benchmark_config_naming_os_system,
        ValueError,
        r"class_path 'os\.system' is not an anomalib model \(a subclass of .*AnomalibModule\)",
    ),
    "weights larger than the backbone": (
        weights_larger_than_the_backbone,
        PretrainedWeightsError,
        r"huge\.pt' was refused before loading: its tensors declare 40\.0 MiB, more than the 2\d\.\d MiB",
    ),
    "unknown backbone name": (
        unknown_backbone,
        ValueError,
        r"Unknown backbone 'ViT-L-14-363'.*Close names: .*ViT-L-14-336",
    ),
    "pretrained tag not available offline": (
        pretrained_tag_offline,
        PretrainedWeightsError,
        r"Could not obtain the pretrained weights 'openai' of backbone 'ViT-B-16'.*pass its path",
    ),
    "feature layer beyond the backbone's depth": (
        feature_layer_too_deep,
        ValueError,
        r"\(2, 5\) is not valid.*4 blocks",
    ),
    "feature layer repeated": (feature_layer_repeated, ValueError, r"\(2, 2, 4\) is not valid.*strictly increasing"),
    "image size below one patch": (image_size_below_one_patch, ValueError, r"image_size=8 is smaller than one patch"),
    "empty class name": (empty_class_name, ValueError, r"class_name must not be empty"),
    "empty class name (torch model)": (empty_class_name_torch_model, ValueError, r"class_name must be a non-empty"),
    "unsupported export type": (unsupported_export_type, ValueError, r"'tensorrt' is not a valid ExportType"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly(name: str, tmp_path: Path) -> None:
    function, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        function(tmp_path)
    assert not list(tmp_path.rglob("support_set.json")), "a refused run wrote its support set"
    assert not list(tmp_path.rglob("*.ckpt")), "a refused run wrote a checkpoint"


# ------------------------------------------------------------------- handled inputs


def test_images_with_1_2_or_4_channels_and_16_bits_are_read_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 65536, (5, 7), dtype=np.uint16)
    rgba = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    grey_alpha = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.PNG")
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "grey_alpha.png")
    expected_grey = torch.from_numpy(grey16.astype(np.float64) / 65535).float().expand(3, 5, 7)
    full_range = ScanReader(intensity="range")
    assert torch.allclose(full_range.read_image(tmp_path / "grey16.png"), expected_grey, atol=1e-6)
    expected_rgb = torch.from_numpy(rgba[..., :3].astype(np.float64) / 255).float().permute(2, 0, 1)
    assert torch.allclose(read_image_file(tmp_path / "rgba.PNG"), expected_rgb, atol=1e-6)
    expected_la = torch.from_numpy(grey_alpha[..., 0].astype(np.float64) / 255).float().expand(3, 5, 7)
    assert torch.allclose(read_image_file(tmp_path / "grey_alpha.png"), expected_la, atol=1e-6)


def test_image_smaller_than_one_patch_is_upscaled_and_scored() -> None:
    tiny_image = torch.rand(1, 5, 5)  # one channel, 5 x 5 pixels, below the 16-pixel patch
    resized = resize_image(tiny_image, TINY_IMAGE_SIZE)
    assert resized.shape == (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    model = tiny_model()
    model.setup("scan")
    prediction = model.eval()(resized[None])
    assert torch.isfinite(prediction.anomaly_map).all()
    assert prediction.anomaly_map.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)


def test_mask_that_is_not_binary_is_thresholded_at_half_its_range(tmp_path: Path, caplog) -> None:
    values = np.array([[0, 40, 127], [128, 200, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "soft.png")
    with caplog.at_level(logging.WARNING):
        mask = read_mask_file(tmp_path / "soft.png")
    assert torch.equal(mask, torch.from_numpy((values >= 127.5).astype(np.uint8)))
    assert "soft.png' is not binary (6 distinct values" in caplog.text
    assert "pixels at or above 0.50 of the full range count as abnormal" in caplog.text
    # a binary mask keeps every "on" pixel, whatever its value (0/1 masks included)
    Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8)).save(tmp_path / "ones.png")
    assert torch.equal(read_mask_file(tmp_path / "ones.png"), torch.tensor([[0, 1], [1, 0]], dtype=torch.uint8))


def test_command_line_reports_bad_input_in_one_line(tmp_path: Path, capsys) -> None:
    code = console(["benchmark", "--config", str(tmp_path / "missing.yaml")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"anomalib-mvfa: error: Benchmark config '{tmp_path / 'missing.yaml'}' does not exist.\n"
    assert "Traceback" not in captured.out + captured.err


def _refuse_network(*_args: object, **_kwargs: object) -> None:
    msg = "network access is blocked while printing the catalogue"
    raise OSError(msg)


def print_catalogue() -> None:
    """Run every case, offline, and print the message a user sees."""
    logging.disable(logging.WARNING)
    for name in ("connect", "connect_ex"):
        setattr(socket.socket, name, _refuse_network)
    socket.create_connection = socket.getaddrinfo = _refuse_network
    for name, (function, _error, _pattern) in CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            try:
                function(Path(folder))
            except Exception as error:  # printed, not handled
                message = str(error).replace(folder, "<tmp>")
                print(f"- {name}: {type(error).__name__}: {message}")
            else:
                print(f"- {name}: NO ERROR")


if __name__ == "__main__":
    sys.exit(print_catalogue())


def test_finite_images_whose_sum_overflows_are_not_refused() -> None:
    """The input check sums the batch first: a sum that overflows (finite values) is looked at value by value."""
    from anomalib_mvfa.encoder import check_images  # noqa: PLC0415
    from anomalib_mvfa.errors import MvfaInputError  # noqa: PLC0415

    huge = torch.full((2, 3, 8, 8), torch.finfo(torch.float32).max / 2)
    assert not torch.isfinite(huge.sum())  # the shortcut cannot decide
    check_images(huge, image_size=8)  # every value finite: accepted
    huge[1, 0, 2, 3] = float("inf")
    with pytest.raises(MvfaInputError, match=r"images contain 1 NaN or infinite value\(s\), the first in image 1"):
        check_images(huge, image_size=8)
