"""End-to-end example of the torch model: ``python -m anomalib_mvfa``.

Few-shot MVFA on texture crops that scikit-image ships (``skimage.data.brick``):
K normal crops and K crops with a synthetic defect (with masks) are augmented into
MVFA's 11 variants, the adapters are trained with MVFA's losses, the memory banks
and calibration are built from the normal crops, and held-out crops are scored.

Example:
    python -m anomalib_mvfa --backbone ViT-B-16 --pretrained openai --image-size 224
    python -m anomalib_mvfa --backbone tiny-clip.json --pretrained none --epochs 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from skimage import data as skimage_data
from torch.nn import functional as F  # noqa: N812
from torchmetrics.functional.classification import binary_auroc

from . import MvfaLoss, MvfaModel, PretrainedWeightsError, augment_support_set
from .backbone import resolve_model_config

CROP = 160


def texture_crops(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``CROP x CROP`` crops of scikit-image's brick texture, RGB in [0, 1]."""
    texture = torch.from_numpy(np.asarray(skimage_data.brick(), dtype=np.float32) / 255.0)
    corners = torch.randint(0, texture.shape[0] - CROP, (count, 2), generator=generator)
    return torch.stack([texture[r : r + CROP, c : c + CROP] for r, c in corners.tolist()])[:, None].repeat(1, 3, 1, 1)


def add_defects(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint a bright elliptic blotch into each image; return the images and the masks."""
    size = images.shape[-1]
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(images.shape[0], size, size)
    for index in range(images.shape[0]):
        centre = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator)
        radii = torch.randint(size // 16, size // 6, (2,), generator=generator)
        masks[index] = (((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1).float()
    defective = images * (1 - masks[:, None]) + masks[:, None] * torch.tensor([0.95, 0.2, 0.2])[:, None, None]
    return defective, masks


def preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to ``size`` and apply CLIP's normalisation."""
    resized = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD)[:, None, None]
    return (resized - mean) / std


def train_adapters(
    model: MvfaModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    epochs: int,
    generator: torch.Generator,
) -> None:
    """MVFA's few-shot optimisation: batch size 1, two Adam optimisers, lr 1e-3, betas (0.5, 0.999)."""
    criterion = MvfaLoss()
    seg_optimizer = torch.optim.Adam(model.seg_adapters.parameters(), lr=1e-3, betas=(0.5, 0.999))
    det_optimizer = torch.optim.Adam(model.det_adapters.parameters(), lr=1e-3, betas=(0.5, 0.999))
    model.train()
    for epoch in range(epochs):
        totals = torch.zeros(2)
        for index in torch.randperm(len(labels), generator=generator).tolist():
            outputs = model(images[index : index + 1])
            seg_loss, det_loss = criterion(outputs, labels[index : index + 1], masks[index : index + 1])
            seg_optimizer.zero_grad()
            det_optimizer.zero_grad()
            (seg_loss + det_loss).backward()
            seg_optimizer.step()
            det_optimizer.step()
            totals += torch.tensor([seg_loss.item(), det_loss.item()])
        print(
            f"epoch {epoch + 1}/{epochs}: segmentation loss {totals[0] / len(labels):.4f}, "
            f"detection loss {totals[1] / len(labels):.4f}"
        )
    model.eval()


def main(argv: list[str] | None = None) -> int:
    """Run the example; return the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m anomalib_mvfa", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="ViT-B-16", help="open_clip model name or model-config JSON file")
    parser.add_argument("--pretrained", default="openai", help="pretrained tag, weights file, or 'none' (random)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--feature-layers", type=int, nargs="+", default=None, help="default: 4 evenly spaced")
    parser.add_argument("--shots", type=int, default=2, help="normal and abnormal support images (K)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    try:
        depth = resolve_model_config(args.backbone)[1]["vision_cfg"]["layers"]
        layers = args.feature_layers or [round(depth * (i + 1) / 4) for i in range(4)]
        model = MvfaModel(args.backbone, pretrained, args.image_size, layers)
    except (PretrainedWeightsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"backbone {args.backbone} ({pretrained or 'RANDOM weights'}), feature layers {model.feature_layers}")

    generator = torch.Generator().manual_seed(args.seed)
    normal = texture_crops(args.shots, generator)
    abnormal, abnormal_masks = add_defects(texture_crops(args.shots, generator), generator)
    masks = torch.cat([torch.zeros_like(abnormal_masks), abnormal_masks])[:, None]
    masks = F.interpolate(masks, size=(args.image_size, args.image_size), mode="nearest")[:, 0]
    support = augment_support_set(preprocess(torch.cat([normal, abnormal]), args.image_size), masks)
    labels = (support.groups >= args.shots).float()

    model.setup("brick")
    train_adapters(model, support.images, labels, support.masks, args.epochs, generator)

    model.eval()
    normal_support = support.groups < args.shots
    model.setup(reference_images=support.images[normal_support], reference_groups=support.groups[normal_support])
    test_normal = texture_crops(4, generator)
    test_abnormal, _ = add_defects(texture_crops(4, generator), generator)
    test_images = preprocess(torch.cat([test_normal, test_abnormal]), args.image_size)
    test_labels = torch.tensor([0] * 4 + [1] * 4)
    with torch.no_grad():
        branches = model.branch_outputs(test_images)
        prediction = model(test_images)

    print(f"{'image':>5} {'label':>8} {'zero-shot':>10} {'few-shot':>9} {'fused':>7}")
    for index in range(len(test_labels)):
        print(
            f"{index:>5} {'abnormal' if test_labels[index] else 'normal':>8} {branches.zero_shot_score[index]:>10.4f} "
            f"{branches.few_shot_score[index]:>9.4f} {prediction.pred_score[index]:>7.3f}"
        )
    auroc = binary_auroc(prediction.pred_score, test_labels).item()
    note = " (RANDOM CLIP weights: meaningless)" if pretrained is None else ""
    print(f"image AUROC on 8 generated test crops: {auroc:.3f}{note}")
    print(f"finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
