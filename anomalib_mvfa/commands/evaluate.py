"""The paper's evaluation protocol: AC and AS under two fusions, over several K-shot draws.

``anomalib-mvfa evaluate`` trains (or loads) MVFA per category and seed on the medical
benchmark layout, scores the test split, and reports image AUROC (AC) and pixel AUROC (AS)
under two fusions of the zero-shot and few-shot branches:

- ``ours``: the model's own online fusion (z-scores calibrated on the normal support images;
  no test statistics), what ``anomalib test`` and deployment see;
- ``authors``: the authors' offline fusion, which min-max normalises each branch over the
  whole test set, averages them 0.5/0.5 and, for categories with masks, takes the image score
  as the maximum of the fused map. It uses test-set statistics and exists only to compare
  with the published numbers.

Example:
    anomalib-mvfa evaluate --root datasets/MVFA --categories Brain Liver --k-shot 4 --seeds 0 1 2
    anomalib-mvfa evaluate --root datasets/MVFA --setting zero-shot --categories all
    anomalib-mvfa evaluate --root datasets/MVFA --setting zero-shot --strategy ddp --devices 4

Every run writes into a new version folder of its own under ``--output`` (``v0``, ``v1``, ...; ``latest``
links the newest, see :mod:`~anomalib_mvfa.commands.run_folder`). ``--categories all`` means the paper's
six categories, every one of which must be under ``--root``; the table's title names what its Average
row averages.

Under DDP every process trains on its share of each step (``--train-batch-size`` images, so the
global batch is N times that), scores its share of the test images, and the scores are gathered
before either fusion normalises them; the first process writes the tables.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from anomalib.engine import Engine
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import InterpolationMode, Resize

from ..data.medical import MEDICAL_CATEGORIES, MedicalAD
from ..data.readers import ScanReader, reader_of
from ..distributed import gather_shards, process_share
from ..errors import MvfaInputError
from ..lightning_model import Mvfa
from ..metrics import exact_auroc, undefined_auroc_reason
from ..reports.cells import Stat
from ..reports.page import SliceThumbnail, TileMap
from ..reports.report import RunReport, make_tile, slice_thumbnail
from ..reports.results import finite_or_none, pick_gallery, pixel_summary, save_maps
from ..studies import (
    StudyLabels,
    StudyResult,
    fit_study_threshold,
    has_volumes,
    read_study_labels,
    study_auroc,
    study_auroc_reason,
    study_results,
)
from ..tensor_files import check_tensor_archive
from ..utils import write_atomically, write_rows
from .options import backbone_arguments
from .options import evaluate as add_arguments  # noqa: F401  (the command's arguments, kept importable here)
from .progress import job_bar, on_terminal, overall_bar, say
from .run_folder import shared_run_folder

logger = logging.getLogger(__name__)

FUSIONS = ("ours", "authors")
# AC: image AUROC; AS: pixel AUROC; study_AUROC: AUROC of the study scores of volumes (anomalib_mvfa.studies)
METRICS = ("AC", "AS", "study_AUROC")


@dataclass
class SplitScores:
    """Everything both fusions need, over a whole test split.

    Attributes:
        labels: ``N`` image labels. masks: ``N x H x W`` or ``None`` (classification category).
        zero_shot_score, zero_shot_map: raw zero-shot branch. few_shot_score, few_shot_map:
            raw few-shot branch, ``None`` without a memory bank.
        score, anomaly_map: the model's own fused outputs.
    """

    labels: torch.Tensor
    masks: torch.Tensor | None
    zero_shot_score: torch.Tensor
    zero_shot_map: torch.Tensor
    few_shot_score: torch.Tensor | None
    few_shot_map: torch.Tensor | None
    score: torch.Tensor
    anomaly_map: torch.Tensor


def min_max(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalisation over all values (the authors' per-branch test-set normalisation)."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low).clamp_min(torch.finfo(values.dtype).eps)


def authors_fusion(outputs: SplitScores) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' fusion: image scores (``N``) and maps (``N x H x W``) from test-set min-max.

    With masks, the image score is the maximum of the fused map; without, the fused detection
    score. Without a memory bank (zero-shot), the zero-shot branch alone takes the same roles.
    """
    if outputs.few_shot_map is None or outputs.few_shot_score is None:
        anomaly_map, detection = outputs.zero_shot_map, outputs.zero_shot_score
    else:
        anomaly_map = 0.5 * min_max(outputs.zero_shot_map) + 0.5 * min_max(outputs.few_shot_map)
        detection = 0.5 * min_max(outputs.zero_shot_score) + 0.5 * min_max(outputs.few_shot_score)
    score = anomaly_map.flatten(1).amax(dim=1) if outputs.masks is not None else detection
    return score, anomaly_map


def auroc_metrics(score: torch.Tensor, anomaly_map: torch.Tensor, outputs: SplitScores) -> dict[str, float | None]:
    """AC (image AUROC) and, with masks, AS (pixel AUROC over all test pixels), in percent.

    An AUROC over one class only is undefined: ``None`` (see :func:`undefined_reasons`).
    """
    metrics: dict[str, float | None] = {"AC": _auroc(score, outputs.labels)}
    if outputs.masks is not None:
        metrics["AS"] = _auroc(anomaly_map.flatten(), outputs.masks.flatten())
    return metrics


def _auroc(values: torch.Tensor, targets: torch.Tensor) -> float | None:
    if undefined_auroc_reason(targets, "AUROC") is not None:
        return None
    return 100 * exact_auroc(values.float(), targets)


def undefined_reasons(outputs: SplitScores) -> list[str]:
    """Why AC or AS of this split are undefined (empty when both are defined)."""
    reasons = [undefined_auroc_reason(outputs.labels, "AC (image AUROC)")]
    if outputs.masks is not None:
        reasons.append(undefined_auroc_reason(outputs.masks.flatten(), "AS (pixel AUROC)"))
    return [reason for reason in reasons if reason is not None]


def fusion_metrics(outputs: SplitScores) -> dict[str, dict[str, float]]:
    """AC/AS under both fusions: ``{"ours": {...}, "authors": {...}}``."""
    return {
        "ours": auroc_metrics(outputs.score, outputs.anomaly_map, outputs),
        "authors": auroc_metrics(*authors_fusion(outputs), outputs),
    }


class ResizedItems(Dataset):
    """Items of an anomalib dataset with image and mask resized to the model's input size.

    Test images of one category may differ in size; resizing each item before collation
    batches them without changing the dataset (its ``augmentations`` are left as they are).
    """

    def __init__(self, dataset: Dataset, size: int) -> None:
        self.dataset = dataset
        self.resize = Resize((size, size), interpolation=InterpolationMode.BICUBIC, antialias=True)

    def __len__(self) -> int:
        """Number of items."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> object:
        """The item at ``index``, resized (bicubic image, nearest-neighbour mask)."""
        item = self.dataset[index]
        if item.gt_mask is None:
            return replace(item, image=self.resize(item.image))
        image, mask = self.resize(item.image, item.gt_mask)
        return replace(item, image=image, gt_mask=mask)


@torch.no_grad()
def score_test_split(model: Mvfa, datamodule: MedicalAD, batch_size: int = 8, split: str = "test") -> SplitScores:
    """Score the datamodule's test split (or ``split="val"``) with the model's own scoring (:meth:`MvfaModel.score`).

    The datamodule and its test dataset are read, not changed (set up first if they are not yet).
    In a process group (DDP), each process scores its unrepeated share of the images, as Lightning's
    test loop of ``Mvfa`` does (:func:`~anomalib_mvfa.distributed.process_share`), and all of them are
    gathered, in order, before anything is normalised: every process returns the whole split's scores.
    """
    if getattr(datamodule, f"{split}_data", None) is None:
        datamodule.setup()
    test_data = getattr(datamodule, f"{split}_data")
    whole = DataLoader(
        ResizedItems(test_data, model.image_size), batch_size=batch_size, shuffle=False, collate_fn=test_data.collate_fn
    )
    loader, indices = process_share(whole)
    model.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in job_bar(loader, len(loader), f"scoring the {split} split"):
        scores = model.score_images(batch.image)
        branches = scores.branches
        values = {
            "labels": batch.gt_label,
            "masks": None if batch.gt_mask is None else (batch.gt_mask > 0),
            "zero_shot_score": branches.zero_shot_score,
            "zero_shot_map": branches.zero_shot_map,
            "few_shot_score": branches.few_shot_score,
            "few_shot_map": branches.few_shot_map,
            "score": scores.pred_score,
            "anomaly_map": scores.anomaly_map,
        }
        for key, value in values.items():
            if value is not None:
                columns.setdefault(key, []).append(value.cpu())
    joined = gather_shards({key: torch.cat(parts) for key, parts in columns.items()}, indices)
    return SplitScores(**{field: joined.get(field) for field in SplitScores.__dataclass_fields__})


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """Mean and standard deviation over seeds per category, plus the average row."""
    metrics = [key for key in rows[0] if key not in {"category", "seed"}] if rows else []
    categories = list(dict.fromkeys(str(row["category"]) for row in rows))
    summary = []
    for category in [*categories, "Average"]:
        if category == "Average":
            group = [row for row in summary if row["category"] != "Average"]
            entry: dict[str, object] = {"category": "Average", "seeds": ""}
            for metric in metrics:
                means = [row[f"{metric}_mean"] for row in group if row.get(f"{metric}_mean") is not None]
                entry[f"{metric}_mean"] = statistics.fmean(means) if means else None
                entry[f"{metric}_std"] = None
        else:
            group = [row for row in rows if row["category"] == category]
            entry = {"category": category, "seeds": len(group)}
            for metric in metrics:
                values = [float(row[metric]) for row in group if row.get(metric) is not None]
                entry[f"{metric}_mean"] = statistics.fmean(values) if values else None
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(entry)
    return summary


def markdown_table(summary: list[dict[str, object]], title: str, undefined: set[tuple[str, str]] | None = None) -> str:
    """The summary in the shape of the paper's table (AC and AS, mean ± std over seeds).

    A cell without a value is empty where the metric was undefined (``(category, metric)`` in
    ``undefined``) and ``-`` where it does not apply (AS without masks).
    """
    undefined = undefined or set()
    columns = [f"{fusion} {metric}" for fusion in FUSIONS for metric in shown_metrics(summary, undefined)]
    lines = [f"### {title}", "", "| dataset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in summary:
        cells = []
        for column in columns:
            fusion, metric = column.split()
            mean, std = row.get(f"{fusion}_{metric}_mean"), row.get(f"{fusion}_{metric}_std")
            if mean is None:
                cells.append("" if (row["category"], metric) in undefined else "-")
            else:
                cells.append(f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}"))
        lines.append(f"| {row['category']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shown_metrics(summary: list[dict[str, object]], undefined: set[tuple[str, str]]) -> tuple[str, ...]:
    """AC and AS, and the study AUROC where some run had volumes (a value, or a reason it is undefined)."""
    studies = any(row.get(f"{fusion}_study_AUROC_mean") is not None for row in summary for fusion in FUSIONS)
    studies = studies or any(metric == "study_AUROC" for _, metric in undefined)
    return METRICS if studies else METRICS[:2]


def _categories(args: argparse.Namespace) -> list[str]:
    """The categories to evaluate; ``all``: the paper's six, every one of which must be under ``--root``.

    Raises:
        MvfaInputError: If ``--categories all`` and a benchmark category's folder is missing.
    """
    if args.categories != ["all"]:
        return list(args.categories)
    missing = [f"{category}_AD" for category in MEDICAL_CATEGORIES if not (Path(args.root) / f"{category}_AD").is_dir()]
    if missing:
        msg = (
            f"--categories all means the paper's six benchmark categories ({', '.join(MEDICAL_CATEGORIES)}), "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing under --root '{args.root}'. "
            "Add them, or name the categories to evaluate (--categories Brain Liver ...)."
        )
        raise MvfaInputError(msg)
    return list(MEDICAL_CATEGORIES)


def average_label(categories: list[str]) -> str:
    """What the table's Average row averages: the paper's six categories, or the ones named.

    Example:
        >>> average_label(["Brain", "Liver"])
        'Average of 2 categories: Brain, Liver'
    """
    if sorted(categories) == sorted(MEDICAL_CATEGORIES):
        return "Average of the paper's six categories"
    return f"Average of {len(categories)} categor{'y' if len(categories) == 1 else 'ies'}: {', '.join(categories)}"


def _check_templates(args: argparse.Namespace) -> None:
    """Refuse path templates with fields other than ``{category}`` and ``{k_shot}`` before any run."""
    for option, template in (("--seed-files", args.seed_files), ("--adapter-checkpoint", args.adapter_checkpoint)):
        if not template:
            continue
        try:
            template.format(category="Brain", k_shot=args.k_shot)
        except (KeyError, IndexError, ValueError) as error:
            msg = (
                f"{option} '{template}' is not a valid path template ({type(error).__name__}: {error}): "
                "it may name the fields {category} and {k_shot} only."
            )
            raise MvfaInputError(msg) from error


def _load_checkpoint(args: argparse.Namespace) -> Mvfa:
    path = Path(args.ckpt_path)
    if not path.is_file():
        msg = f"Checkpoint '{path}' does not exist."
        raise MvfaInputError(msg)
    check_tensor_archive(path, "Checkpoint")  # before torch's reader sees a hostile archive
    pipeline = {"feature_pipeline": args.feature_pipeline} if args.feature_pipeline else {}
    try:
        return Mvfa.load_from_checkpoint(path, map_location="cpu", weights_only=True, **pipeline)
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        msg = f"Checkpoint '{path}' cannot be read as an Mvfa checkpoint ({type(error).__name__}: {error})."
        raise MvfaInputError(msg) from error


def _datamodule(args: argparse.Namespace, category: str, seed: int) -> MedicalAD:
    seed_file = args.seed_files.format(category=category, k_shot=args.k_shot) if args.seed_files else None
    return MedicalAD(
        root=args.root,
        category=category,
        train_categories=["others"] if args.setting == "zero-shot" else None,
        seed_file=seed_file if args.setting == "few-shot" else None,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        seed=seed,
    )


def _model(args: argparse.Namespace, category: str, seed: int) -> Mvfa:
    if args.ckpt_path:
        return _load_checkpoint(args)
    adapters = args.adapter_checkpoint.format(category=category) if args.adapter_checkpoint else None
    return Mvfa(
        **backbone_arguments(args, pretrained="openai", image_size=240),
        k_shot=0 if args.setting == "zero-shot" else args.k_shot,
        epochs=args.epochs,
        batch_size=args.train_batch_size,
        seed=seed,
        adapter_checkpoint=adapters,
    )


def _engine(args: argparse.Namespace, root: Path) -> Engine:
    devices: int | str = int(args.devices) if str(args.devices).isdigit() else args.devices
    return Engine(
        default_root_dir=root,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        logger=False,
        enable_progress_bar=on_terminal(),  # no control characters in redirected output
    )


def _say(*lines: str) -> None:
    """Print on the first process only (all of them run this command under DDP)."""
    if rank_zero_only.rank == 0:
        say(*lines)


@dataclass
class Totals:
    """What the runs of one ``evaluate`` command add up to."""

    rows: list[dict[str, object]] = field(default_factory=list)  # one per run: AC and AS of both fusions
    images: list[dict[str, object]] = field(default_factory=list)  # one per test image of every run
    studies: list[dict[str, object]] = field(default_factory=list)  # one per test volume of every run
    study_slices: list[SliceThumbnail] = field(default_factory=list)  # the highest slice of each of studies
    pixels: list[dict[str, object]] = field(default_factory=list)  # one per run with masks
    pipelines: set[str] = field(default_factory=set)
    k_shots: set[int] = field(default_factory=set)
    random_weights: bool = False
    undefined: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (category, metric) -> reasons
    report: RunReport = field(default_factory=RunReport)


def _thresholds(model: Mvfa) -> tuple[float | None, float | None]:
    """The image and pixel thresholds of the model's own scores, set on the validation split (not the test)."""
    post_processor = getattr(model, "post_processor", None)
    if post_processor is None or not hasattr(post_processor, "image_threshold"):
        return None, None
    return finite_or_none(post_processor.image_threshold), finite_or_none(post_processor.pixel_threshold)


def _evaluate_run(args: argparse.Namespace, category: str, seed: int, totals: Totals, output: Path) -> None:
    """Train (or load) and score one category and seed into ``output``; add its rows and gallery to ``totals``."""
    datamodule = _datamodule(args, category, seed)
    model = _model(args, category, seed)
    totals.pipelines.add(model.feature_pipeline.value)
    totals.k_shots.add(model.k_shot)
    totals.random_weights = totals.random_weights or model.hparams.get("pretrained") is None
    engine = _engine(args, output / "runs" / category / f"seed{seed}")
    if not args.ckpt_path:
        engine.fit(model, datamodule=datamodule)  # trains; with epochs=0 only builds memory banks
    scores = score_test_split(model, datamodule, args.batch_size)
    metrics = fusion_metrics(scores)
    reasons = undefined_reasons(scores)
    for reason in reasons:  # logged, and named under the table
        rank_zero_only(logger.warning)("%s, seed %d: %s.", category, seed, reason)
        totals.undefined.setdefault((category, reason.split()[0]), []).append(f"{category} seed {seed}: {reason}")
    studies = split_study_results(args, model, datamodule, scores)
    if studies is not None:
        reason = study_auroc_reason(studies["ours"])
        if reason is not None:
            rank_zero_only(logger.warning)("%s, seed %d: %s.", category, seed, reason)
            totals.undefined.setdefault((category, "study_AUROC"), []).append(f"{category} seed {seed}: {reason}")
            reasons.append(reason)
        for fusion in FUSIONS:
            value = study_auroc(studies[fusion])
            metrics[fusion]["study_AUROC"] = None if value is None else 100 * value
    row: dict[str, object] = {"category": category, "seed": seed}
    for fusion in FUSIONS:
        for metric in METRICS:
            row[f"{fusion}_{metric}"] = metrics[fusion].get(metric)
    totals.rows.append(row)
    values = ", ".join(f"{key} {value:.2f}" for key, value in row.items() if isinstance(value, float))
    _say("   " + values + "".join(f"; {reason}" for reason in reasons))
    if rank_zero_only.rank == 0:
        thresholds = _thresholds(model)
        _record_run(datamodule, scores, thresholds, category, seed, output, totals, first=seed == args.seeds[0])
        if studies is not None:
            _record_studies(studies, category, seed, totals)
            totals.study_slices += top_slice_thumbnails(studies["ours"], scores, reader_of(datamodule), thresholds)


def split_study_results(
    args: argparse.Namespace, model: Mvfa, datamodule: MedicalAD, scores: SplitScores
) -> dict[str, Any] | None:
    """Study results of the test split under both fusions (and the study threshold); ``None`` without volumes.

    The study threshold (of the model's own scores) is fitted on the validation split's studies,
    scored here for that; the authors' fusion has no threshold (it normalises with the test set).
    With ``--study-labels``, the file's labels are the studies' labels of both splits.
    """
    samples = datamodule.test_data.samples
    if "study" not in samples or not has_volumes(list(samples["study"])):
        return None
    files = [str(path) for path in samples.image_path]
    method, k = args.study_score, args.study_k
    given = _study_labels(args)
    val_data = getattr(datamodule, "val_data", None)
    threshold = None
    if val_data is not None and "study" in val_data.samples:
        validation = score_test_split(model, datamodule, args.batch_size, split="val")
        val_studies = list(val_data.samples["study"])
        fitted = study_results(val_studies, validation.score, validation.labels, None, method, k, study_labels=given)
        threshold = fit_study_threshold(fitted)
    studies = list(samples["study"])
    return {
        "ours": study_results(studies, scores.score, scores.labels, files, method, k, threshold, given),
        "authors": study_results(studies, authors_fusion(scores)[0], scores.labels, files, method, k, None, given),
        "threshold": threshold,
    }


def _study_labels(args: argparse.Namespace) -> StudyLabels | None:
    """The labels of ``--study-labels`` (:func:`~anomalib_mvfa.studies.read_study_labels`), ``None`` without it."""
    path = getattr(args, "study_labels", None)
    return None if not path else read_study_labels(path)


def _record_studies(studies: dict[str, Any], category: str, seed: int, totals: Totals) -> None:
    """One row per test volume: its slices, label, scores under both fusions, threshold and decision."""
    threshold = studies["threshold"]
    for ours, authors in zip(studies["ours"], studies["authors"], strict=True):
        totals.studies.append(
            {
                "category": category,
                "seed": seed,
                "study": ours.study,
                "slices": ours.slices,
                "label": ours.label,
                "score_ours": ours.score,
                "threshold_ours": threshold,
                "decision_ours": ours.decision,
                "top_slice_ours": ours.top_name,
                "score_authors": authors.score,
            }
        )


def ours_view(scores: SplitScores, index: int, thresholds: tuple[float | None, float | None]) -> TileMap:
    """The model's own (``ours``) map, score, threshold and decision of test image ``index``, as pictures show it."""
    image_threshold, pixel_threshold = thresholds
    score = float(scores.score[index])
    decision = None if image_threshold is None else int(score > image_threshold)
    scale = "zero-shot score" if scores.few_shot_score is None else "z-score"
    return TileMap("ours", scores.anomaly_map[index].numpy(), score, image_threshold, decision, scale, pixel_threshold)


def top_slice_thumbnails(
    results: list[StudyResult], scores: SplitScores, reader: ScanReader, thresholds: tuple[float | None, float | None]
) -> list[SliceThumbnail]:
    """Each study's highest slice as the study table shows it: read with the run's ``reader``, its ``ours`` map over it.

    ``results`` are the studies of the test split (:func:`~anomalib_mvfa.studies.study_results`, with names);
    a slice that cannot be read is named with the reason (:func:`~anomalib_mvfa.reports.report.slice_thumbnail`).
    """
    return [
        slice_thumbnail(
            result.top_name, reader, ours_view(scores, result.top_slice, thresholds), Path(result.top_name).name
        )
        for result in results
    ]


def _record_run(
    datamodule: MedicalAD,
    scores: SplitScores,
    thresholds: tuple[float | None, float | None],
    category: str,
    seed: int,
    output: Path,
    totals: Totals,
    first: bool,
) -> None:
    """Per-image rows, saved maps, pixel figures, curve data and (first seed) the gallery of one run."""
    samples = datamodule.test_data.samples
    files = [str(path) for path in samples.image_path]
    masks_on_disk = [str(path) if isinstance(path, str) else "" for path in samples.get("mask_path", [""] * len(files))]
    studies = [str(study) for study in samples.get("study", files)]
    slices = [int(index) for index in samples.get("slice", [0] * len(files))]
    image_threshold, pixel_threshold = thresholds
    authors_score, authors_map = authors_fusion(scores)
    map_paths = save_maps(scores.anomaly_map, files, output / "maps" / category / f"seed{seed}")
    for index, file in enumerate(files):
        score = float(scores.score[index])
        totals.images.append(
            {
                "file": file,
                "study": studies[index],
                "slice": slices[index],
                "category": category,
                "seed": seed,
                "label": int(scores.labels[index]),
                "score_ours": score,
                "score_authors": float(authors_score[index]),
                "zero_shot_score": float(scores.zero_shot_score[index]),
                "few_shot_score": None if scores.few_shot_score is None else float(scores.few_shot_score[index]),
                "threshold_ours": image_threshold,
                "decision_ours": None if image_threshold is None else int(score > image_threshold),
                "map_ours": str(map_paths[index]),
                "mask": masks_on_disk[index],
            }
        )
    report = totals.report
    report.add_images(category, seed, "ours", scores.score, scores.labels)
    report.add_images(category, seed, "authors", authors_score, scores.labels)
    if scores.masks is not None:
        report.add_pixels(category, seed, {"ours": scores.anomaly_map, "authors": authors_map}, scores.masks)
        totals.pixels.append(
            {
                "category": category,
                "seed": seed,
                **pixel_summary(scores.anomaly_map, scores.masks, pixel_threshold),
                "pixel_threshold_ours": pixel_threshold,
            }
        )
        report.add_summary(category, totals.pixels[-1])
    if first:
        test_data = ResizedItems(datamodule.test_data, scores.anomaly_map.shape[-1])
        for kind, index in pick_gallery(scores.score, scores.labels, image_threshold):
            item = test_data[index]
            views = [
                ours_view(scores, index, thresholds),
                TileMap("authors", authors_map[index].numpy(), float(authors_score[index]), None, None, "test min-max"),
            ]
            mask = None if scores.masks is None else scores.masks[index]
            tile = make_tile(kind, files[index], int(scores.labels[index]), item.image, mask, views, model="ours")
            report.add_tile(category, tile)


def run(args: argparse.Namespace) -> int:
    """Evaluate every category and seed; print and save the tables and the report; return an exit code.

    Under DDP (``--strategy ddp --devices N``, torchrun or SLURM) every process trains and scores
    its share, the scores are gathered, and the first process prints and writes the tables.
    """
    categories = _categories(args)
    _check_templates(args)
    _study_labels(args)  # a bad labels file stops the command before any training
    with shared_run_folder(args.output) as output:
        return _run_into(args, categories, output)


def _run_into(args: argparse.Namespace, categories: list[str], output: Path) -> int:
    """:func:`run`, writing into the run folder ``output``."""
    totals = Totals()
    with overall_bar(len(categories) * len(args.seeds), "evaluate") as bar:
        if rank_zero_only.rank != 0:
            bar.disable = True
        for category in categories:
            for seed in args.seeds:
                _say(f"== {category}, {args.setting}, seed {seed}")
                _evaluate_run(args, category, seed, totals, output)
                bar.update()

    summary = summarise(totals.rows)
    shots = ", ".join(f"{k}-shot" if k else "zero-shot" for k in sorted(totals.k_shots))
    pipelines = " and ".join(sorted(totals.pipelines))
    title = (
        f"MVFA {shots}, {len(args.seeds)} seed(s), feature pipeline {pipelines}, AUROC %; {average_label(categories)}"
    )
    if totals.random_weights:
        title += " (RANDOM CLIP weights: the numbers mean nothing)"
    table = markdown_table(summary, title, set(totals.undefined))
    note = (
        "ours: the model's online fusion (calibrated on the support images, no test statistics). "
        "authors: min-max of each branch over the test set, then 0.5/0.5 (max of the map for AC where masks "
        "exist); uses test-set statistics, for comparison with the paper only. '-': not applicable (no masks).\n"
    )
    if totals.studies:
        method = f"top_k_mean, k={args.study_k}" if args.study_score == "top_k_mean" else args.study_score
        truth = (
            f"labelled by {args.study_labels}" if args.study_labels else "a study abnormal when any of its slices is"
        )
        note += (
            f"study_AUROC: AUROC of the study scores ({method} of the slice scores) of the test split's volumes "
            f"(NIfTI files, DICOM series), {truth}; study decisions use a threshold "
            "fitted on the validation split's volumes.\n"
        )
    if totals.undefined:
        reasons = [reason for group in totals.undefined.values() for reason in group]
        note += "Empty cells and means over fewer seeds: undefined metrics, left out. " + "; ".join(reasons) + ".\n"
    _say("\n" + table + "\n" + note)
    if rank_zero_only.rank != 0:
        return 0  # the first process writes the tables
    stem = "_".join(f"few-shot_{k}shot" if k else "zero-shot" for k in sorted(totals.k_shots))
    _write_tables(output, stem, totals.rows, table + "\n" + note)
    write_rows(output / f"{stem}_images.csv", totals.images)
    if totals.studies:
        write_rows(output / f"{stem}_studies.csv", totals.studies)
    if totals.pixels:
        write_rows(output / f"{stem}_pixels.csv", totals.pixels)
    tables = {"AUROC % (mean ± std over seeds)": _report_rows(summary)}
    if totals.studies:
        heading = (
            "Studies: one row per test volume (ours; score of its slices, decision at the study threshold; "
            "its highest slice under ours' map, one colour scale over the table)"
        )
        tables[heading] = [
            study_report_row(row, thumbnail) for row, thumbnail in zip(totals.studies, totals.study_slices, strict=True)
        ]
    notes = [note, THRESHOLD_NOTE]
    warning = "Random CLIP weights: the numbers mean nothing." if totals.random_weights else None
    page = totals.report.write(output, f"{stem}_report.html", title, tables, notes, warning)
    print(f"per-image results in {output / f'{stem}_images.csv'}, curves in {output / 'curves'}, report {page}")
    return 0


THRESHOLD_NOTE = (
    "Decisions (threshold_ours, decision_ours, the gallery's false positives and negatives) use the model's "
    "F1-adaptive thresholds set on the validation split (the support pool) less the support images the model "
    "was trained and calibrated on, never on the test labels. "
    "The authors' fusion has no threshold: it is normalised with the test set's own minimum and maximum."
)


def _report_rows(summary: list[dict[str, object]]) -> list[dict[str, object]]:
    """The summary as the page's table: one row per category, ``mean ± std`` cells."""
    rows = []
    metrics = shown_metrics(summary, set())
    for entry in summary:
        row: dict[str, object] = {"category": entry["category"], "seeds": entry["seeds"]}
        for fusion in FUSIONS:
            for metric in metrics:
                mean, std = entry.get(f"{fusion}_{metric}_mean"), entry.get(f"{fusion}_{metric}_std")
                row[f"{fusion} {metric}"] = None if mean is None else Stat(mean, std, percent=True)
        rows.append(row)
    return rows


def study_report_row(row: dict[str, object], highest_slice: SliceThumbnail | None = None) -> dict[str, object]:
    """A volume's row of the report page's study table; ``highest_slice`` shows its highest slice, else its name.

    Example:
        >>> row = {"category": "CT", "seed": 0, "study": "1.2.3", "slices": 40, "label": 1, "score_ours": 2.5,
        ...        "threshold_ours": 1.0, "decision_ours": 1, "top_slice_ours": "ct/IM0031.dcm"}
        >>> study_report_row(row)["decision"], study_report_row(row)["highest slice"]
        ('abnormal', 'IM0031.dcm')
    """
    decision = row.get("decision_ours")
    return {
        "category": row["category"],
        "seed": row["seed"],
        "study": row["study"],
        "slices": row["slices"],
        "label": "abnormal" if row.get("label") else "normal",
        "score": row["score_ours"],
        "decision": None if decision is None else ("abnormal" if decision else "normal"),
        "highest slice": highest_slice or Path(str(row.get("top_slice_ours") or "")).name,
    }


def _write_tables(output: Path, stem: str, rows: list[dict[str, object]], markdown: str) -> None:
    """Write ``<stem>_runs.csv`` (one row per run) and ``<stem>.md``, each whole or not at all."""
    write_rows(output / f"{stem}_runs.csv", rows)
    write_atomically(output / f"{stem}.md", lambda name: Path(name).write_text(markdown))
    print(f"tables written to {output / f'{stem}.md'} and {output / f'{stem}_runs.csv'}")
