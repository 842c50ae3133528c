"""The medical anomaly-detection benchmark layout used by MVFA (BMAD-derived).

Layout: ``<root>/<Name>_AD/{valid,test}/{good,Ungood}/img/<file>``, with masks for the
segmentation categories at ``<root>/<Name>_AD/<split>/Ungood/anomaly_mask/<same file>``.
``Name`` is one of Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, Histopathology, or any
other ``<Name>_AD`` folder laid out the same way.

Splits of :class:`MedicalAD`:

- few-shot (default): ``train_data`` and ``val_data`` are the category's ``valid`` split (the
  pool of normal and abnormal support images, and of anomalib's thresholds); ``test_data`` is
  its ``test`` split.
- zero-shot across datasets (``train_categories`` given): ``train_data`` holds the labelled
  images of the other categories (their ``test`` split, as in the paper, or ``valid``), each
  prompted with its own category's class name; ``val_data`` and ``test_data`` are as above.

Files are read with :class:`~anomalib_mvfa.data.readers.ScanReader`: PNG, JPEG and TIFF in every
image mode and bit depth, DICOM (one sample per frame) and NIfTI (one sample per slice), any
letter case of the file suffix.

Example:
    >>> from anomalib_mvfa.data import MedicalAD
    >>> datamodule = MedicalAD(root="datasets/MVFA", category="Brain")  # doctest: +SKIP
    >>> datamodule.setup()  # doctest: +SKIP
    >>> len(datamodule.test_data)  # doctest: +SKIP
    3715
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from anomalib.data import AnomalibDataModule
from anomalib.data.utils import LabelName, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

from ..errors import MvfaInputError
from ..prompting import prompt_class_name
from .datasets import (
    ScanDataset,
    check_studies_in_one_folder,
    file_identities,
    file_sample_rows,
    find_mask,
    mask_index,
    segmentation_masks,
)
from .readers import DEFAULT_READER, ScanReader, file_format, resolve_reader

logger = logging.getLogger(__name__)

MEDICAL_CATEGORIES = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")
SEGMENTATION_CATEGORIES = ("Brain", "Liver", "Retina_RESC")
SPLITS = ("valid", "test")
SEED_LINE = re.compile(r"^\s*([an])-(\d+)\s*:\s*(.*)$")
LABELS = ("good", "ungood")  # label folders of a split, compared in lower case


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_file() and file_format(path) is not None)


def layout_folder(parent: Path, name: str) -> Path:
    """The child folder of ``parent`` named ``name`` in any letter case (``ungood``, ``IMG``, ...).

    Returns ``parent / name`` when there is none (callers treat it as empty).

    Raises:
        ValueError: If several children match, for example ``Ungood`` and ``ungood``.
    """
    if not parent.is_dir():
        return parent / name
    matches = sorted(child for child in parent.iterdir() if child.is_dir() and child.name.lower() == name.lower())
    if len(matches) > 1:
        names = [match.name for match in matches]
        msg = f"'{parent}' holds {len(matches)} folders named '{name}' in different letter cases: {names}."
        raise MvfaInputError(msg)
    return matches[0] if matches else parent / name


def category_folder(root: str | Path, category: str) -> Path:
    """``<root>/<category>_AD``, checked to exist.

    Raises:
        ValueError: If the folder is missing; the message lists the categories found.
    """
    if not Path(root).is_dir():
        msg = f"Dataset root '{root}' does not exist: expected the folder that holds the <Name>_AD category folders."
        raise MvfaInputError(msg)
    folder = Path(root) / f"{category}_AD"
    if not folder.is_dir():
        found = sorted(p.name.removesuffix("_AD") for p in Path(root).glob("*_AD") if p.is_dir())
        msg = f"Category folder '{folder}' does not exist. Categories under '{root}': {found or 'none'}."
        raise MvfaInputError(msg)
    return folder


def make_medical_samples(
    root: str | Path, category: str, split: str, reader: ScanReader = DEFAULT_READER
) -> pd.DataFrame:
    """Samples table (anomalib's columns plus ``category`` and ``source_file``) of one category and split.

    Raises:
        ValueError: If the split holds no image.
    """
    base = layout_folder(category_folder(root, category), split)
    _warn_about_unknown_folders(base)
    rows = []
    for label, label_index in (("good", LabelName.NORMAL), ("Ungood", LabelName.ABNORMAL)):
        label_folder = layout_folder(base, label)
        mask_folder = layout_folder(label_folder, "anomaly_mask")
        masks = mask_index([mask_folder]) if mask_folder.is_dir() else {}
        references = segmentation_masks([mask_folder]) if mask_folder.is_dir() else {}
        files = _image_files(layout_folder(label_folder, "img"))
        identities = file_identities(reader, files)
        for path in files:
            mask = find_mask(path, masks, references) if label_index == LabelName.ABNORMAL else None
            for row in file_sample_rows(reader, path, label_index, split, mask, base, identities.get(path)):
                # a slice of an abnormal volume whose label-volume slice is empty is a normal sample
                row_label = "Ungood" if row["label_index"] == LabelName.ABNORMAL else "good"
                rows.append({**row, "label": row_label, "category": category})
    if not rows:
        msg = f"Split '{base}' holds no image: expected images in {base}/good/img and {base}/Ungood/img."
        raise MvfaInputError(msg)
    _check_masks(rows, category, base, reader)
    check_studies_in_one_folder(pd.DataFrame(rows))
    normal = sum(row["label_index"] == LabelName.NORMAL for row in rows)
    with_masks = sum(bool(row["mask_path"]) for row in rows)
    logger.info(
        "MedicalAD %s/%s: %d normal and %d abnormal images (%d with masks).",
        category,
        split,
        normal,
        len(rows) - normal,
        with_masks,
    )
    return pd.DataFrame(rows)


def _warn_about_unknown_folders(base: Path) -> None:
    """Name the folders of a split that the layout does not read (a misspelt label loses its images)."""
    if not base.is_dir():
        return
    unknown = sorted(child.name for child in base.iterdir() if child.is_dir() and child.name.lower() not in LABELS)
    if unknown:
        logger.warning(
            "Split '%s' holds folders that are not read: %s (expected 'good' and 'Ungood', any letter case).",
            base,
            unknown,
        )


def _check_masks(rows: list[dict], category: str, base: Path, reader: ScanReader) -> None:
    """Every abnormal image needs a mask where the category has masks (or some of its images do).

    A mask folder in which every mask is empty is refused too: its annotation was not read.
    """
    abnormal = [row for row in rows if row["label_index"] == LabelName.ABNORMAL]
    missing = [Path(row["image_path"]).name for row in abnormal if not row["mask_path"]]
    masked = [row["mask_path"] for row in abnormal if row["mask_path"]]
    if masked and not any(reader.read_mask(path).any() for path in masked):
        msg = (
            f"Every one of the {len(masked)} masks of abnormal images in '{Path(masked[0]).parent}' is empty: "
            "no abnormal pixel was found in any channel (alpha included). Check that the masks mark the "
            "anomalies with non-zero values."
        )
        raise MvfaInputError(msg)
    if not missing or (category not in SEGMENTATION_CATEGORIES and len(missing) == len(abnormal)):
        return
    reason = "it is a segmentation category" if category in SEGMENTATION_CATEGORIES else "other images have masks"
    msg = (
        f"{len(missing)} of the {len(abnormal)} abnormal images in '{base}/Ungood/img' have no mask, although "
        f"{reason}: expected for example '{base}/Ungood/anomaly_mask/{missing[0]}' (missing: {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''})."
    )
    raise MvfaInputError(msg)


class MedicalADDataset(ScanDataset):
    """Images of one or several categories of the medical layout.

    Args:
        root: Folder holding the ``<Name>_AD`` folders.
        categories: Category names (``Brain``, ...).
        split: ``"valid"`` or ``"test"``.
        augmentations: Optional transforms applied to each item.
        reader: The reader (intensity, NIfTI slicing); the default :class:`ScanReader` when ``None``.
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str],
        split: str,
        augmentations: Transform | None = None,
        reader: ScanReader | None = None,
    ) -> None:
        super().__init__(reader=reader, augmentations=augmentations)
        if split not in SPLITS:
            msg = f"split must be one of {SPLITS}, got '{split}'."
            raise MvfaInputError(msg)
        self.root = Path(root)
        self.split = split
        self._category = categories[0] if len(categories) == 1 else "+".join(categories)
        samples = pd.concat([make_medical_samples(root, category, split, self.reader) for category in categories])
        samples = samples.reset_index(drop=True)
        has_masks = (samples.mask_path != "").any()
        samples.attrs["task"] = "segmentation" if has_masks else "classification"
        self.samples = samples


def parse_seed_file(path: str | Path) -> dict[int, dict[str, list[str]]]:
    """Parse an authors'-format seed file: lines ``a-<i>: files...`` and ``n-<i>: files...``.

    Returns:
        ``{i: {"abnormal": [...], "normal": [...]}}``.

    Raises:
        ValueError: If the file is missing or a line does not follow the format.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Seed file '{path}' does not exist."
        raise MvfaInputError(msg)
    draws: dict[int, dict[str, list[str]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        match = SEED_LINE.match(line)
        if match is None:
            msg = f"Seed file '{path}', line {number}: expected 'a-<i>: files...' or 'n-<i>: files...', got {line!r}."
            raise MvfaInputError(msg)
        kind, index, files = match.groups()
        group = draws.setdefault(int(index), {"abnormal": [], "normal": []})
        group["abnormal" if kind == "a" else "normal"] = files.replace(",", " ").split()
    return draws


def _seed_line_numbers(path: Path) -> dict[tuple[str, int], int]:
    """``{("a" or "n", seed): line number}`` of an authors'-format seed file."""
    numbers = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = SEED_LINE.match(line)
        if match is not None:
            numbers[match.group(1), int(match.group(2))] = number
    return numbers


class MedicalAD(AnomalibDataModule):
    """Datamodule of the medical benchmark layout (see the module docstring).

    Args:
        root: Folder holding the ``<Name>_AD`` folders.
        category: The category to test on (and, few-shot, to draw support images from).
        train_categories: Zero-shot across datasets: categories whose labelled images train
            the adapters. ``["others"]`` means every other category under ``root``.
        zero_shot_split: Split of the training categories used for zero-shot training:
            ``"test"`` (the paper) or ``"valid"``.
        seed_file: Authors'-format seed file fixing the few-shot subsets; the model's seed
            selects the line (``a-<seed>``, ``n-<seed>``).
        class_names: Prompt class name per category, overriding the paper's names.
        reader: How files become images, as in :class:`~anomalib_mvfa.data.MedicalFolder`; the
            default :class:`~anomalib_mvfa.data.readers.ScanReader` when ``None``.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Data-loading workers.
        augmentations: Transforms applied to every split.
        seed: Seed of anomalib's data handling.

    Example:
        >>> MedicalAD(root="datasets/MVFA", category="Liver", train_categories=["others"])  # doctest: +SKIP
        >>> brain_window = ScanReader(intensity="window", window=(40, 80))
        >>> MedicalAD(root="datasets/CT", category="Head", reader=brain_window)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path = "./datasets/MVFA",
        category: str = "Brain",
        train_categories: Sequence[str] | None = None,
        zero_shot_split: str = "test",
        seed_file: str | Path | None = None,
        class_names: dict[str, str] | None = None,
        reader: ScanReader | None = None,
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        augmentations: Transform | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augmentations=augmentations,
            test_split_mode=TestSplitMode.FROM_DIR,  # the test split as it is on disk
            val_split_mode=ValSplitMode.FROM_DIR,
            seed=seed,
        )
        if zero_shot_split not in SPLITS:
            msg = f"zero_shot_split must be one of {SPLITS}, got '{zero_shot_split}'."
            raise MvfaInputError(msg)
        if class_names is not None and any(not str(name).strip() for name in class_names.values()):
            msg = f"class_names must map categories to non-empty names, got {class_names}."
            raise MvfaInputError(msg)
        self.root = Path(root)
        self.category = category
        self.train_categories = list(train_categories) if train_categories else None
        self.zero_shot_split = zero_shot_split
        self.seed_file = Path(seed_file) if seed_file else None
        self.class_names = dict(class_names or {})
        self.reader = resolve_reader(reader)

    @property
    def name(self) -> str:
        """Name used in anomalib's result folders."""
        return "MedicalAD"

    def resolved_train_categories(self) -> list[str] | None:
        """The zero-shot training categories, ``"others"`` expanded; ``None`` few-shot."""
        if not self.train_categories:
            return None
        if self.train_categories == ["others"]:
            found = sorted(p.name.removesuffix("_AD") for p in self.root.glob("*_AD") if p.is_dir())
            return [category for category in found if category != self.category]
        if self.category in self.train_categories:
            msg = f"train_categories {self.train_categories} contain the test category '{self.category}'."
            raise MvfaInputError(msg)
        return self.train_categories

    def _setup(self, _stage: str | None = None) -> None:
        train_categories = self.resolved_train_categories()
        if train_categories is None:
            self.train_data = MedicalADDataset(self.root, [self.category], "valid", reader=self.reader)
        else:
            if not train_categories:
                msg = f"No category besides '{self.category}' under '{self.root}' to train zero-shot on."
                raise MvfaInputError(msg)
            self.train_data = MedicalADDataset(self.root, train_categories, self.zero_shot_split, reader=self.reader)
        self.val_data = MedicalADDataset(self.root, [self.category], "valid", reader=self.reader)
        self.test_data = MedicalADDataset(self.root, [self.category], "test", reader=self.reader)

    def prompt_name(self, category: str) -> str:
        """Class name in the prompts for ``category`` (``class_names`` first, then the paper's)."""
        return self.class_names.get(category) or prompt_class_name(category)

    def support_files(
        self, seed: int, k_shot: int | None = None, kinds: Sequence[str] = ("normal", "abnormal")
    ) -> dict[str, list[str]] | None:
        """File names the seed file fixes for ``seed`` (``None`` without a seed file).

        Args:
            seed: Selects the lines ``n-<seed>`` and ``a-<seed>``.
            k_shot: When given, each line of ``kinds`` must name at least this many files (the
                first ``k_shot`` are used, as in the authors' code).
            kinds: The lines that must exist: ``"normal"`` (``n-``) and/or ``"abnormal"`` (``a-``).

        Raises:
            ValueError: If a line of ``kinds`` is missing, names a file twice or fewer than ``k_shot`` files; the
                message names the file and the line.
        """
        if self.seed_file is None:
            return None
        draws = parse_seed_file(self.seed_file)
        if seed not in draws:
            msg = f"Seed file '{self.seed_file}' has no lines 'a-{seed}'/'n-{seed}'; it has seeds {sorted(draws)}."
            raise MvfaInputError(msg)
        lines = _seed_line_numbers(self.seed_file)
        for kind in kinds:
            prefix = "n" if kind == "normal" else "a"
            number = lines.get((prefix, seed))
            if number is None:
                msg = f"Seed file '{self.seed_file}' has no '{prefix}-{seed}' line for the {kind} support images."
                raise MvfaInputError(msg)
            count = len(draws[seed][kind])
            names = [Path(file).name for file in draws[seed][kind]]
            if repeated := next((name for name in names if names.count(name) > 1), None):
                msg = (
                    f"Seed file '{self.seed_file}', line {number} ('{prefix}-{seed}') names '{repeated}' "
                    f"{names.count(repeated)} times: each support image must be a different file."
                )
                raise MvfaInputError(msg)
            if k_shot is not None and count < k_shot:
                msg = (
                    f"Seed file '{self.seed_file}', line {number} ('{prefix}-{seed}') names {count} file(s); "
                    f"k_shot={k_shot} needs {k_shot}."
                )
                raise MvfaInputError(msg)
        return draws[seed]
