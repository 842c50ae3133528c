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

Under DDP every process trains on its share of each step (``--train-batch-size`` images, so the
global batch is N times that), scores its share of the test images, and the scores are gathered
before either fusion normalises them; the first process writes the tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import pickle
import statistics
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from anomalib.engine import Engine
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.functional.classification import binary_auroc
from torchvision.transforms.v2 import InterpolationMode, Resize

from ..data.medical import MEDICAL_CATEGORIES, MedicalAD
from ..distributed import gather_shards, process_rank_and_count
from ..lightning_model import Mvfa
from ..metrics import undefined_auroc_reason
from ..pipeline import add_feature_pipeline_argument
from ..utils import write_atomically

logger = logging.getLogger(__name__)

FUSIONS = ("ours", "authors")


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
    return 100 * binary_auroc(values.float(), targets.long()).item()


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
def score_test_split(model: Mvfa, datamodule: MedicalAD, batch_size: int = 8) -> SplitScores:
    """Score the datamodule's test split with the model's own scoring (:meth:`MvfaModel.score`).

    The datamodule and its test dataset are read, not changed (set up first if they are not yet).
    In a process group (DDP), each process scores every N-th image and all of them are gathered,
    in order, before anything is normalised: every process returns the whole split's scores.
    """
    if getattr(datamodule, "test_data", None) is None:
        datamodule.setup()
    test_data = datamodule.test_data
    rank, processes = process_rank_and_count()
    indices = list(range(rank, len(test_data), processes))
    loader = DataLoader(
        Subset(ResizedItems(test_data, model.image_size), indices),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=test_data.collate_fn,
    )
    model.eval()
    columns: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        scores = model.model.score(model.preprocess(batch.image.to(model.device)))
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
    columns = [f"{fusion} {metric}" for fusion in FUSIONS for metric in ("AC", "AS")]
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``anomalib-mvfa evaluate``."""
    parser.add_argument("--root", required=True, help="folder holding the <Name>_AD folders")
    parser.add_argument("--categories", nargs="+", default=["all"], help="categories, or 'all' (the six)")
    parser.add_argument("--setting", choices=("few-shot", "zero-shot"), default="few-shot")
    parser.add_argument("--k-shot", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="K-shot draws (seed-file lines)")
    parser.add_argument("--seed-files", default=None, help="seed-file path template with {category} and {k_shot}")
    parser.add_argument("--epochs", type=int, default=50, help="0 evaluates --adapter-checkpoint without training")
    parser.add_argument("--adapter-checkpoint", default=None, help="adapters file, or template with {category}")
    parser.add_argument("--ckpt-path", default=None, help="a Lightning checkpoint of Mvfa to evaluate as it is")
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag, weights file, or 'none'")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--feature-layers", type=int, nargs="+", default=[6, 12, 18, 24])
    add_feature_pipeline_argument(parser, "authors; with --ckpt-path, the checkpoint's")
    parser.add_argument("--batch-size", type=int, default=8, help="test images scored at once, per process")
    parser.add_argument(
        "--train-batch-size", type=int, default=1, help="training images a step, per process (the paper: 1)"
    )
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    parser.add_argument("--devices", default="1", help="devices per node (a number, 'auto' or a list such as 0,1)")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy; ddp for several devices")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of a multi-node run")
    parser.add_argument("--output", default="results/evaluation", help="folder for the CSV and Markdown tables")


def _categories(args: argparse.Namespace) -> list[str]:
    if args.categories == ["all"]:
        return [c for c in MEDICAL_CATEGORIES if (Path(args.root) / f"{c}_AD").is_dir()]
    return list(args.categories)


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
            raise ValueError(msg) from error


def _load_checkpoint(args: argparse.Namespace) -> Mvfa:
    path = Path(args.ckpt_path)
    if not path.is_file():
        msg = f"Checkpoint '{path}' does not exist."
        raise ValueError(msg)
    pipeline = {"feature_pipeline": args.feature_pipeline} if args.feature_pipeline else {}
    try:
        return Mvfa.load_from_checkpoint(path, map_location="cpu", weights_only=True, **pipeline)
    except (RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        msg = f"Checkpoint '{path}' cannot be read as an Mvfa checkpoint ({type(error).__name__}: {error})."
        raise ValueError(msg) from error


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
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    adapters = args.adapter_checkpoint.format(category=category) if args.adapter_checkpoint else None
    return Mvfa(
        backbone=args.backbone,
        pretrained=pretrained,
        image_size=args.image_size,
        feature_layers=args.feature_layers,
        feature_pipeline=args.feature_pipeline,
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
    )


def _say(*lines: str) -> None:
    """Print on the first process only (all of them run this command under DDP)."""
    if rank_zero_only.rank == 0:
        print(*lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate every category and seed; print and save the tables; return an exit code.

    Under DDP (``--strategy ddp --devices N``, torchrun or SLURM) every process trains and scores
    its share, the scores are gathered, and the first process prints and writes the tables.
    """
    categories = _categories(args)
    if not categories:
        print(f"error: no category folder (<Name>_AD) found under {args.root}")
        return 2
    _check_templates(args)
    output = Path(args.output)
    rows: list[dict[str, object]] = []
    pipelines: set[str] = set()
    k_shots: set[int] = set()
    random_weights = False
    undefined: dict[tuple[str, str], list[str]] = {}  # (category, metric) -> reasons
    for category in categories:
        for seed in args.seeds:
            _say(f"== {category}, {args.setting}, seed {seed}")
            datamodule = _datamodule(args, category, seed)
            model = _model(args, category, seed)
            pipelines.add(model.feature_pipeline.value)
            k_shots.add(model.k_shot)
            random_weights = random_weights or model.hparams.get("pretrained") is None
            run_root = output / "runs" / category / f"seed{seed}"
            engine = _engine(args, run_root)
            if not args.ckpt_path:
                engine.fit(model, datamodule=datamodule)  # trains; with epochs=0 only builds memory banks
            scores = score_test_split(model, datamodule, args.batch_size)
            metrics = fusion_metrics(scores)
            reasons = undefined_reasons(scores)
            for reason in reasons:  # logged, and named under the table
                rank_zero_only(logger.warning)("%s, seed %d: %s.", category, seed, reason)
                undefined.setdefault((category, reason.split()[0]), []).append(f"{category} seed {seed}: {reason}")
            row: dict[str, object] = {"category": category, "seed": seed}
            for fusion in FUSIONS:
                for metric in ("AC", "AS"):
                    row[f"{fusion}_{metric}"] = metrics[fusion].get(metric)
            rows.append(row)
            values = ", ".join(f"{key} {value:.2f}" for key, value in row.items() if isinstance(value, float))
            _say("   " + values + "".join(f"; {reason}" for reason in reasons))

    summary = summarise(rows)
    shots = ", ".join(f"{k}-shot" if k else "zero-shot" for k in sorted(k_shots))
    title = f"MVFA {shots}, {len(args.seeds)} seed(s), feature pipeline {' and '.join(sorted(pipelines))}, AUROC %"
    if random_weights:
        title += " (RANDOM CLIP weights: the numbers mean nothing)"
    table = markdown_table(summary, title, set(undefined))
    note = (
        "ours: the model's online fusion (calibrated on the support images, no test statistics). "
        "authors: min-max of each branch over the test set, then 0.5/0.5 (max of the map for AC where masks "
        "exist); uses test-set statistics, for comparison with the paper only. '-': not applicable (no masks).\n"
    )
    if undefined:
        reasons = [reason for group in undefined.values() for reason in group]
        note += "Empty cells and means over fewer seeds: undefined metrics, left out. " + "; ".join(reasons) + ".\n"
    _say("\n" + table + "\n" + note)
    if rank_zero_only.rank != 0:
        return 0  # the first process writes the tables
    stem = "_".join(f"few-shot_{k}shot" if k else "zero-shot" for k in sorted(k_shots))
    _write_tables(output, stem, rows, table + "\n" + note)
    return 0


def _write_tables(output: Path, stem: str, rows: list[dict[str, object]], markdown: str) -> None:
    """Write ``<stem>_runs.csv`` (one row per run) and ``<stem>.md``, each whole or not at all."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(output / f"{stem}_runs.csv", lambda name: Path(name).write_text(buffer.getvalue()))
    write_atomically(output / f"{stem}.md", lambda name: Path(name).write_text(markdown))
    print(f"tables written to {output / f'{stem}.md'} and {output / f'{stem}_runs.csv'}")
