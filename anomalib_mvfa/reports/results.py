"""Per-image results of a test split: the rows people run their own statistics on.

- :func:`save_maps` writes each image's anomaly map as a float16 ``.npy`` file named after the
  sample, so a row can point at its map;
- :func:`pixel_summary` gives the pixel-level figures of a split with masks: pixel AUROC,
  AUPRO (anomalib's, up to 30% false-positive rate) and the Dice score of the maps thresholded at a
  threshold chosen without the test labels;
- :func:`pick_gallery` chooses the images a report shows: the worst false positives and false
  negatives and a few true positives;
- :func:`pixel_sample` draws a seeded sample of pixels for pixel-level curves of large splits.

Example:
    >>> import torch
    >>> pick_gallery(torch.tensor([0.9, 0.2, 0.8, 0.1]), torch.tensor([0, 0, 1, 1]), threshold=0.5)
    [('false positive', 0), ('false negative', 3), ('true positive', 2)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from anomalib.metrics import AUPRO

from ..errors import MvfaInputError
from ..metrics import exact_auroc, undefined_auroc_reason
from ..utils import write_atomically

# pixels of one run that pixel-level curves are drawn from at most (the printed AUROC uses all)
PIXEL_CURVE_SAMPLE = 1_000_000


def map_file_name(sample: str) -> str:
    """A file name for the map of ``sample`` (a path, or ``file#frame=NNN``): its name, made safe.

    Example:
        >>> map_file_name("/data/Brain_AD/test/Ungood/img/00012.png")
        '00012.png.npy'
        >>> map_file_name("/scans/case1.nii.gz#axial=080")
        'case1.nii.gz_axial080.npy'
    """
    file, _, part = str(sample).partition("#")
    name = Path(file).name + (("_" + part.replace("=", "")) if part else "")
    return re.sub(r"[^\w.\-]", "_", name) + ".npy"


def save_maps(maps: torch.Tensor, samples: Sequence[str], folder: str | Path) -> list[Path]:
    """Write ``maps`` (``N x H x W``) as ``<folder>/<sample name>.npy`` (float16), one per sample.

    Two samples of the same file name in different folders (``good/001.png`` and
    ``Ungood/001.png``) get their parent folder's name in front. Each file is written whole.

    Returns:
        The paths, in the order of ``samples``.
    """
    if maps.shape[0] != len(samples):
        msg = f"save_maps got {maps.shape[0]} maps for {len(samples)} samples; expected one map per sample."
        raise MvfaInputError(msg)
    folder = Path(folder)
    names = [map_file_name(sample) for sample in samples]
    repeated = {name for name in names if names.count(name) > 1}
    paths = []
    for sample, name, values in zip(samples, names, maps.detach().cpu().to(torch.float16).numpy(), strict=True):
        parent = Path(str(sample).partition("#")[0]).parent.name
        path = folder / (f"{parent}_{name}" if name in repeated else name)

        def write(temporary: str, values: np.ndarray = values) -> None:
            with open(temporary, "wb") as file:
                np.save(file, values)

        write_atomically(path, write)
        paths.append(path)
    return paths


def dice(predicted: torch.Tensor, target: torch.Tensor) -> float | None:
    """Dice score ``2 |P and G| / (|P| + |G|)`` over all pixels; ``None`` when both are empty."""
    predicted, target = predicted.bool(), target.bool()
    total = predicted.sum() + target.sum()
    if total == 0:
        return None
    return (2 * (predicted & target).sum() / total).item()


def this_process_only(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
    """A torchmetrics ``dist_sync_fn`` that gathers nothing: a metric computed with it keeps this process's values.

    Example:
        >>> this_process_only(torch.ones(2))
        [tensor([1., 1.])]
    """
    del group
    return [tensor]


def pixel_summary(anomaly_map: torch.Tensor, masks: torch.Tensor, threshold: float | None) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO (to 30% FPR) and Dice at ``threshold`` of one split (``N x H x W`` each).

    ``threshold`` must come from data other than the test split (the validation split's
    F1-adaptive threshold); ``None`` leaves Dice out. Undefined figures (masks of one class) are ``None``.
    """
    masks = masks.bool()
    if undefined_auroc_reason(masks.flatten(), "pixel AUROC") is not None:
        return {"pixel_AUROC": None, "AUPRO": None, "Dice": None}
    # this process's values only (under DDP the first process alone computes the summaries): anomalib's
    # AUPRO takes no sync_on_compute, but its dist_sync_fn gathers, and this one gathers nothing
    aupro = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3, dist_sync_fn=this_process_only)
    aupro.update(SimpleNamespace(anomaly_map=anomaly_map.float(), gt_mask=masks.long()))
    return {
        "pixel_AUROC": exact_auroc(anomaly_map.float(), masks),
        "AUPRO": aupro.compute().item(),
        "Dice": None if threshold is None else dice(anomaly_map > threshold, masks),
    }


def pick_gallery(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None,
    false_positives: int = 3,
    false_negatives: int = 3,
    true_positives: int = 2,
) -> list[tuple[str, int]]:
    """Indices of the images a gallery shows, with their kind.

    The worst false positives (normal images scored highest above ``threshold``), the worst false
    negatives (anomalous images scored lowest at or below it) and the surest true positives. Without a
    threshold (the run has none), the highest-scored normal images and the lowest-scored anomalous
    ones stand in for the mistakes ("highest normal", "lowest anomalous").
    """
    scores, labels = scores.float().cpu(), labels.long().cpu()
    normal = [int(i) for i in torch.argsort(scores, descending=True) if labels[i] == 0]
    abnormal = [int(i) for i in torch.argsort(scores) if labels[i] == 1]
    if threshold is None:
        picked = [("highest normal", i) for i in normal[:false_positives]]
        picked += [("lowest anomalous", i) for i in abnormal[:false_negatives]]
        return picked + [("true positive", i) for i in abnormal[::-1][:true_positives]]
    picked = [("false positive", i) for i in normal if scores[i] > threshold][:false_positives]
    picked += [("false negative", i) for i in abnormal if scores[i] <= threshold][:false_negatives]
    return picked + [("true positive", i) for i in abnormal[::-1] if scores[i] > threshold][:true_positives]


def pixel_sample(
    maps: Sequence[torch.Tensor], masks: torch.Tensor, limit: int = PIXEL_CURVE_SAMPLE, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same seeded sample of at most ``limit`` pixels from each of ``maps`` and from ``masks``.

    All pixels, in order, when there are no more than ``limit``.
    """
    count = masks.numel()
    if count <= limit:
        return [values.flatten().float() for values in maps], masks.flatten().long()
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit]
    return [values.flatten()[chosen].float() for values in maps], masks.flatten()[chosen].long()


def finite_or_none(value: float | torch.Tensor | None) -> float | None:
    """``value`` as a float, ``None`` for ``None`` or NaN (a threshold never set)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value
