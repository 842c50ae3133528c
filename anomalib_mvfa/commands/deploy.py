"""Deployment paths side by side: ``anomalib-mvfa speed --deploy``.

One process, one fitted model, the same images and memory bank for every path:

- ``torch float32``: eager PyTorch, the reference every other path is compared with;
- ``torch bf16 encoder``: the model with ``inference_precision="bfloat16"`` (reloaded from its
  checkpoint): the image encoder under bfloat16 autocast, the branches, search and fusion in float32;
- ``torch bf16 encoder+search``: the same with ``search_precision="bfloat16"`` too (neighbours chosen
  with bfloat16 similarities, their distances exact);
- ``torch bf16 autocast``: the whole model under ``torch.autocast`` to bfloat16 (on the CPU; on
  CUDA too when ``--device`` is one);
- ``torch.compile``: the model compiled by TorchInductor (its compile time is printed apart);
- ``onnxruntime``: anomalib's ONNX export of the model, run by ONNX Runtime on the CPU;
- ``openvino f32``: anomalib's OpenVINO export with the ``f32`` inference precision hint;
- ``openvino default``: the same export at OpenVINO's default precision (bfloat16 on CPUs that
  have it);
- ``openvino int8``: anomalib's export with ``compression_type=int8_ptq`` (NNCF), calibrated on the
  training split: normal images only, never a test image.

For each: images per second (median of ``--repeats`` batches), the peak resident memory of the
process while the path ran, and its fidelity against torch float32 on a held-out generated set that
nothing was fitted or calibrated on: the largest absolute difference of image scores and of anomaly
maps, the Spearman rank correlation of the image scores, and the change of image and pixel AUROC in
points. A path whose library is missing or that fails prints why instead of a row.

Example:
    anomalib-mvfa speed --deploy --backbone ViT-B-16 --image-size 224 --k-shot 4 --batch-size 8
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from ..data import ScanReader
from ..errors import MvfaInputError
from ..lightning_model import Mvfa
from .benchmark.runner import PeakMemory
from .demo import demo_datamodule, demo_model, generate_dataset

logger = logging.getLogger(__name__)

# CPU features that decide which reduced precisions run natively
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

Runner = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


@dataclass
class PreparedPath:
    """One deployment path, ready: its runner, setup time, memory it added, and its held-out outputs."""

    name: str
    runner: Runner
    setup_seconds: float
    added_memory_mb: float
    scores: np.ndarray
    maps: np.ndarray


@dataclass
class HeldOut:
    """Generated held-out images at the model's size, their masks and labels."""

    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray


def environment_line(device: torch.device) -> str:
    """Threads, the CPU's reduced-precision features and the library versions, in one line.

    Example:
        >>> "threads" in environment_line(torch.device("cpu"))
        True
    """
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    found = [flag for flag in CPU_FEATURES if flag in flags] or ["none found"]
    versions = []
    for package in ("torch", "onnxruntime", "openvino", "nncf"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} missing")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"CPU features: {' '.join(found)}{gpu}; {', '.join(versions)}"
    )


def held_out_set(root: Path, size: int, count: int, seed: int) -> HeldOut:
    """``count`` normal and ``count`` defective generated crops at ``size`` pixels, never used to fit.

    Example:
        >>> held = held_out_set(Path("/tmp/held"), 64, 2, seed=1)  # doctest: +SKIP
        >>> held.images.shape, held.labels.tolist()  # doctest: +SKIP
        (torch.Size([4, 3, 64, 64]), [0, 0, 1, 1])
    """
    folder = generate_dataset(root, seed=seed, n_train=0, n_test=count)
    reader = ScanReader()
    files = sorted((folder / "test" / "good").glob("*.png")) + sorted((folder / "test" / "defect").glob("*.png"))
    images = torch.stack([reader.read_image(path) for path in files])
    images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    masks = np.zeros((len(files), size, size), dtype=np.uint8)
    for index, path in enumerate(files[count:], start=count):
        mask = reader.read_mask(folder / "ground_truth" / "defect" / path.name).float()
        masks[index] = F.interpolate(mask[None, None], size=(size, size), mode="nearest")[0, 0].numpy() > 0
    labels = np.array([0] * count + [1] * count)
    return HeldOut(images.clamp(0, 1), masks, labels)


def fitted_model(args: argparse.Namespace, root: Path) -> tuple[Mvfa, object]:
    """Mvfa fitted on a generated training folder (its memory bank, adapters and thresholds); its datamodule."""
    from anomalib.engine import Engine  # noqa: PLC0415

    model = demo_model(args, pretrained="none")
    datamodule = demo_datamodule(generate_dataset(root, seed=args.seed), args.seed, args.batch_size)
    engine = Engine(
        default_root_dir=root / "run", accelerator=args.device.split(":")[0], devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    engine.fit(model, datamodule=datamodule)
    return model.eval(), datamodule


def _torch_runner(model: Mvfa, autocast: torch.dtype | None = None) -> Runner:
    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
            output = model(images)
        return output.pred_score.float().cpu().numpy(), output.anomaly_map.float().cpu().numpy()

    return run


def _reloaded_in_bfloat16(model: Mvfa, run_folder: Path, device: torch.device, search: str = "float32") -> Mvfa:
    """The fitted model reloaded from its checkpoint in bfloat16, as a user sets it.

    ``inference_precision="bfloat16"``, and ``search`` as its ``search_precision``.
    """
    checkpoint = next(run_folder.rglob("model.ckpt"), None)
    if checkpoint is None:
        msg = f"no model.ckpt under {run_folder}: the fit wrote no checkpoint to reload."
        raise FileNotFoundError(msg)
    reloaded = Mvfa.load_from_checkpoint(
        checkpoint, inference_precision="bfloat16", search_precision=search, map_location=device
    )
    if reloaded.image_size != model.image_size:
        msg = f"the reloaded checkpoint scores {reloaded.image_size}-pixel images, the fitted model {model.image_size}."
        raise ValueError(msg)
    return reloaded.eval().to(device)


def _onnx_runner(model: Mvfa, folder: Path, size: int) -> Runner:
    import onnxruntime  # noqa: PLC0415

    path = model.to_onnx(folder, input_size=(size, size))
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads leave the cores
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        outputs = dict(zip(names, session.run(None, {"input": images.cpu().numpy()}), strict=True))
        return outputs["pred_score"], outputs["anomaly_map"]

    return run


def _openvino_runner(path: Path, precision: str | None) -> Runner:
    import openvino  # noqa: PLC0415

    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    compiled = openvino.Core().compile_model(str(path), "CPU", config)
    names = [output.get_any_name() for output in compiled.outputs]

    def run(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        result = compiled(images.cpu().numpy())
        outputs = {name: result[index] for index, name in enumerate(names)}
        return np.asarray(outputs["pred_score"]), np.asarray(outputs["anomaly_map"])

    return run


def deployment_paths(
    model: Mvfa, datamodule: object, folder: Path, size: int, device: torch.device
) -> Iterator[tuple[str, Callable[[], Runner]]]:
    """Each path's name and a function that prepares it (exports, compiles) and returns its runner."""
    from anomalib.deploy import CompressionType  # noqa: PLC0415

    yield "torch float32", lambda: _torch_runner(model)
    run_folder = folder.parent / "run"
    yield "torch bf16 encoder", lambda: _torch_runner(_reloaded_in_bfloat16(model, run_folder, device))
    yield (
        "torch bf16 encoder+search",
        lambda: _torch_runner(_reloaded_in_bfloat16(model, run_folder, device, "bfloat16")),
    )
    yield "torch bf16 autocast", lambda: _torch_runner(model, torch.bfloat16)
    yield "torch.compile", lambda: _torch_runner(torch.compile(model))  # type: ignore[arg-type]
    if device.type != "cpu":
        return  # the exports below run on the CPU
    yield "onnxruntime", lambda: _onnx_runner(model, folder / "onnx", size)

    @functools.cache
    def openvino_export(compression: CompressionType | None = None) -> Path:
        """One export for each compression, compiled under each precision hint."""
        name = "openvino" if compression is None else f"openvino_{compression.value}"
        return model.to_openvino(
            folder / name, input_size=(size, size), compression_type=compression, datamodule=datamodule
        )

    yield "openvino f32", lambda: _openvino_runner(openvino_export(), "f32")
    yield "openvino default", lambda: _openvino_runner(openvino_export(), None)
    yield "openvino int8", lambda: _openvino_runner(openvino_export(CompressionType.INT8_PTQ), None)


def prepare_path(name: str, prepare: Callable[[], Runner], held: HeldOut, batch_size: int) -> PreparedPath:
    """Prepare the path (export, compile, warm up) and score the held-out set with it, watching the memory."""
    baseline = PeakMemory.resident_mb()
    with PeakMemory() as memory:
        started = time.perf_counter()
        runner = prepare()
        runner(held.images[:batch_size])  # warm-up: compiles, allocates
        setup = time.perf_counter() - started
        starts = range(0, len(held.labels), batch_size)
        outputs = [runner(held.images[start : start + batch_size]) for start in starts]
    scores = np.concatenate([np.asarray(score).reshape(-1) for score, _ in outputs])
    maps = np.concatenate([np.asarray(values).reshape(-1, *held.masks.shape[1:]) for _, values in outputs])
    return PreparedPath(name, runner, setup, memory.peak_mb - baseline, scores, maps)


def images_per_second(paths: list[PreparedPath], batch: torch.Tensor, repeats: int) -> list[float]:
    """Each path's images per second: the median of ``repeats`` rounds, each timing every path once in turn.

    Interleaving the paths spreads a noisy machine's slow moments over all of them alike.
    """
    seconds: list[list[float]] = [[] for _ in paths]
    for _ in range(repeats):
        for index, path in enumerate(paths):
            started = time.perf_counter()
            path.runner(batch)
            seconds[index].append(time.perf_counter() - started)
    return [len(batch) / statistics.median(each) for each in seconds]


def fidelity(result: PreparedPath, reference: PreparedPath, held: HeldOut) -> str:
    """The table cells comparing ``result`` with ``reference``: score and map differences, Spearman, AUROC changes."""
    from scipy.stats import spearmanr  # noqa: PLC0415
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    score_difference = float(np.abs(result.scores - reference.scores).max())
    map_difference = float(np.abs(result.maps - reference.maps).max())
    rank = float(spearmanr(result.scores, reference.scores).statistic)
    image = 100 * (roc_auc_score(held.labels, result.scores) - roc_auc_score(held.labels, reference.scores))
    pixels = held.masks.reshape(-1)
    pixel = 100 * (roc_auc_score(pixels, result.maps.reshape(-1)) - roc_auc_score(pixels, reference.maps.reshape(-1)))
    return f"{score_difference:.2e} | {map_difference:.2e} | {rank:.4f} | {image:+.2f} | {pixel:+.2f}"


DEPLOY_PATHS = (
    "torch float32", "torch bf16 encoder", "torch bf16 encoder+search", "torch bf16 autocast", "torch.compile",
    "onnxruntime", "openvino f32", "openvino default", "openvino int8",
)  # fmt: skip


def chosen_paths(paths: str | None) -> set[str]:
    """The paths named in ``--paths`` (comma-separated), with the reference ``torch float32``; all when ``None``.

    Example:
        >>> sorted(chosen_paths("onnxruntime"))
        ['onnxruntime', 'torch float32']
    """
    if paths is None:
        return set(DEPLOY_PATHS)
    chosen = {name.strip() for name in paths.split(",") if name.strip()}
    unknown = sorted(chosen - set(DEPLOY_PATHS))
    if unknown:
        msg = f"--paths names {unknown}: expected some of {', '.join(DEPLOY_PATHS)}."
        raise MvfaInputError(msg)
    return chosen | {"torch float32"}


def run(args: argparse.Namespace) -> int:
    """Fit once, measure every deployment path, print the table; return an exit code."""
    chosen = chosen_paths(args.paths)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    print(environment_line(device))
    with tempfile.TemporaryDirectory(prefix="mvfa-deploy-") as temporary:
        root = Path(temporary)
        model, datamodule = fitted_model(args, root)
        size = model.image_size
        held = held_out_set(root / "held_out", size, args.held_out, args.seed + 1)
        held.images = held.images.to(device)
        model = model.to(device)
        print(
            f"{args.backbone} at {size}, K={args.k_shot}, batch {args.batch_size}, {len(held.labels)} held-out "
            f"images ({int(held.labels.sum())} defective), device {device}"
        )
        paths: list[PreparedPath] = []
        for name, prepare in deployment_paths(model, datamodule, root / "exports", size, device):
            if name not in chosen:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # exporters' and compilers' notes
                    paths.append(prepare_path(name, prepare, held, args.batch_size))
            except Exception as error:  # every path's failure is reported, the others still run
                print(f"{name}: unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        speeds = images_per_second(paths, held.images[: args.batch_size], args.repeats)
    print(
        "\n| path | images/s | vs torch float32 | memory added (MB) | setup (s) | largest score difference | "
        "largest map difference | Spearman of scores | image AUROC change (points) | pixel AUROC change (points) |"
    )
    print("|" + "---|" * 10)
    for path, speed in zip(paths, speeds, strict=True):
        print(
            f"| {path.name} | {speed:.2f} | {speed / speeds[0]:.2f}x | {path.added_memory_mb:.0f} | "
            f"{path.setup_seconds:.1f} | {fidelity(path, paths[0], held)} |"
        )
    return 0
