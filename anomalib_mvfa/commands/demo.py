"""End-to-end demo: few-shot MVFA on a small histology dataset generated on the spot.

The dataset is cut from the immunohistochemistry image that scikit-image ships: normal
crops, and crops with synthetic defects (blotches of a foreign texture, with masks), in
an anomalib folder layout. MVFA is trained few-shot through anomalib's Engine, tested,
and its metrics and the place of anomalib's visualisations are printed.

Example:
    anomalib-mvfa demo                                   # ViT-B-16, OpenAI weights
    anomalib-mvfa demo --backbone tiny-random --epochs 1 # offline, random weights
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from anomalib.data import Folder
from anomalib.engine import Engine
from PIL import Image
from skimage import data as skimage_data

from ..backbone import PretrainedWeightsError
from ..lightning_model import Mvfa
from .options import backbone_arguments
from .options import demo as add_arguments  # noqa: F401  (the command's arguments, kept importable here)

logger = logging.getLogger(__name__)

CATEGORY = "histology"
CROP = 128
RANDOM_WEIGHTS_NOTE = "scores come from RANDOM CLIP weights and mean nothing"


def _defect(crop: np.ndarray, rng: np.random.Generator, texture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend an elliptic blotch of a foreign texture into ``crop``; return the image and its mask."""
    rows, cols = np.mgrid[0:CROP, 0:CROP]
    centre = rng.integers(CROP // 4, 3 * CROP // 4, 2)
    radii = rng.integers(CROP // 12, CROP // 5, 2)
    angle = rng.uniform(0, np.pi)
    y, x = rows - centre[0], cols - centre[1]
    u = (x * np.cos(angle) + y * np.sin(angle)) / radii[1]
    v = (-x * np.sin(angle) + y * np.cos(angle)) / radii[0]
    mask = (u**2 + v**2) <= 1.0
    top, left = rng.integers(0, texture.shape[0] - CROP, 2)
    patch = texture[top : top + CROP, left : left + CROP].astype(np.float32)
    tint = np.array([0.45, 0.3, 0.55]) * 255  # a dark purple stain
    foreign = 0.5 * patch[..., None] + 0.5 * tint
    blended = crop.astype(np.float32)
    blended[mask] = foreign[mask]
    return blended.clip(0, 255).astype(np.uint8), (mask * 255).astype(np.uint8)


def generate_dataset(root: str | Path, seed: int = 0, n_train: int = 16, n_test: int = 12) -> Path:
    """Write the demo dataset under ``root/histology`` in an anomalib folder layout.

    Layout: ``train/good``, ``test/good``, ``test/defect`` and ``ground_truth/defect``
    (masks with the same file names). Returns the category folder.

    Example:
        >>> folder = generate_dataset("datasets/mvfa_demo")  # doctest: +SKIP
        >>> sorted(p.name for p in folder.iterdir())  # doctest: +SKIP
        ['ground_truth', 'test', 'train']
    """
    rng = np.random.default_rng(seed)
    tissue = skimage_data.immunohistochemistry()
    texture = skimage_data.gravel()
    folder = Path(root) / CATEGORY

    def crop() -> np.ndarray:
        top, left = rng.integers(0, tissue.shape[0] - CROP, 2)
        return tissue[top : top + CROP, left : left + CROP]

    def save(image: np.ndarray, relative: str) -> None:
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    for index in range(n_train):
        save(crop(), f"train/good/{index:03d}.png")
    for index in range(n_test):
        save(crop(), f"test/good/{index:03d}.png")
        image, mask = _defect(crop(), rng, texture)
        save(image, f"test/defect/{index:03d}.png")
        save(mask, f"ground_truth/defect/{index:03d}.png")
    return folder


def demo_model(args: argparse.Namespace, pretrained: str | None = "openai") -> Mvfa:
    """``Mvfa`` of the command line's backbone, K, epochs and seed, prompting for histology crops.

    Example:
        >>> model = demo_model(argparse.Namespace(backbone="tiny-random", pretrained=None, image_size=None,
        ...     feature_layers=None, feature_pipeline=None, k_shot=2, epochs=0, seed=0))  # doctest: +SKIP
    """
    return Mvfa(
        **backbone_arguments(args, pretrained, image_size=224),
        k_shot=args.k_shot,
        class_name="histopathological image",
        epochs=args.epochs,
        seed=args.seed,
    )


def demo_datamodule(folder: Path, seed: int, batch_size: int = 8) -> Folder:
    """The ``Folder`` datamodule of anomalib over a dataset written by :func:`generate_dataset`."""
    return Folder(
        name="mvfa_demo",
        root=folder,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/defect",
        mask_dir="ground_truth/defect",
        train_batch_size=batch_size,
        eval_batch_size=batch_size,
        num_workers=0,
        seed=seed,
    )


def run(args: argparse.Namespace) -> int:
    """Generate the dataset, train and test MVFA, print the metrics; return an exit code."""
    try:
        model = demo_model(args)
        pretrained = model.hparams["pretrained"]
        model.build_model()  # loads the weights now: without them the demo stops before writing anything
    except (PretrainedWeightsError, ValueError) as error:
        print(f"anomalib-mvfa: error: {error}", file=sys.stderr)
        print(
            "Offline, pass a local weights file (--pretrained /path/to/weights.pt) or run the tiny random\n"
            "backbone (--backbone tiny-random), whose scores mean nothing.",
            file=sys.stderr,
        )
        return 2

    folder = generate_dataset(args.root, seed=args.seed)
    print(f"demo dataset: {folder} (normal and defective histology crops, masks in ground_truth/defect)")
    datamodule = demo_datamodule(folder, args.seed)
    engine = Engine(default_root_dir=args.results, accelerator="auto", devices=1)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule, verbose=False)[0]

    note = f"  ({RANDOM_WEIGHTS_NOTE})" if pretrained is None else ""
    print(
        f"\nMVFA demo results: {args.backbone} ({pretrained or 'random weights'}), {args.k_shot}-shot, "
        f"{args.epochs} epoch(s), test split of {folder}{note}"
    )
    print(f"{'metric':<16}{'value':>8}")
    for name, value in sorted(results.items()):
        print(f"{name:<16}{value:>8.3f}{note}")
    images = Path(engine.trainer.default_root_dir) / "images"
    print(f"visualisations: {images}")
    print(f"adapters (authors' layout): {Path(engine.trainer.default_root_dir) / 'weights' / 'mvfa_adapters.pth'}")
    return 0
