"""Shared fixtures: a tiny random open_clip backbone, and no network for the whole run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer
from PIL import Image

from anomalib_mvfa import Mvfa, MvfaModel

from .browser import chromium

TINY_IMAGE_SIZE = 64
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": TINY_IMAGE_SIZE, "layers": 4, "width": 48, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class NetworkBlockedError(OSError):
    """Raised when a test tries to open a network connection."""


@pytest.fixture(autouse=True, scope="session")
def _block_network() -> None:
    """Fail any connection attempt, so a hidden download fails a test instead of hanging it."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        msg = "network access is blocked in the test suite"
        raise NetworkBlockedError(msg)

    patcher = pytest.MonkeyPatch()
    patcher.setattr(socket.socket, "connect", refuse)
    patcher.setattr(socket.socket, "connect_ex", refuse)
    patcher.setattr(socket, "create_connection", refuse)
    patcher.setattr(socket, "getaddrinfo", refuse)
    yield
    patcher.undo()


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of an open_clip model-config JSON file for a tiny CLIP (width 48, 4 blocks, patch 16)."""
    path = tmp_path_factory.mktemp("backbone") / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


# words of the tiny text tower's vocabulary: the prompt ensemble's, then letters for anything else
TINY_VOCABULARY = (
    "a an of the photo image picture close up cropped bright dark black white jpeg good nice small large flawless "
    "perfect unblemished without with flaw defect damage damaged abnormal normal broken object brain skin bottle "
    "chest liver retina histopathology there is something"
)


def write_timm_backbone(folder: Path) -> Path:
    """A tiny open_clip config with a timm ViT image tower and a Hugging Face BERT text tower, all local.

    The image tower is timm's ``vit_tiny_patch16_224`` (12 blocks, width 192, random); the text tower
    a 2-layer BERT of width 32 whose config and WordPiece vocabulary are written here: nothing is
    downloaded. The layout is BiomedCLIP's (``timm_pool ""``, linear projection, MLP text projection).
    """
    text = folder / "tiny-bert"
    text.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *sorted(set(TINY_VOCABULARY.split()))]
    words = list(dict.fromkeys([*words, *letters, *(f"##{letter}" for letter in letters)]))  # one index each
    (text / "vocab.txt").write_text("\n".join(words) + "\n")
    bert = {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(words), "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
        "type_vocab_size": 2, "pad_token_id": 0,
    }  # fmt: skip
    (text / "config.json").write_text(json.dumps(bert))
    tokenizer = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64}
    (text / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    config = {
        "embed_dim": 24,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(text), "hf_tokenizer_name": str(text), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32},
    }  # fmt: skip
    path = folder / "tiny-timm-bert.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def timm_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny timm-tower, BERT-text-tower open_clip config (see :func:`write_timm_backbone`)."""
    return write_timm_backbone(tmp_path_factory.mktemp("timm-backbone"))


@pytest.fixture
def tiny_model(tiny_config: Path) -> MvfaModel:
    """A tiny MvfaModel with seeded random CLIP and adapter weights and text features for 'bottle'."""
    torch.manual_seed(0)
    model = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4))
    model.setup("bottle")
    return model


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    x = np.linspace(0, 6 * np.pi, size)
    image = np.sin(x)[None, :] * np.cos(x)[:, None] * 60 + 128 + rng.normal(0, 8, (size, size))
    return np.clip(np.stack([image] * 3, axis=-1), 0, 255).astype(np.uint8)


def _defective(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = _texture(rng, size), np.zeros((size, size), np.uint8)
    row, col = rng.integers(8, size - 24, 2)
    mask[row : row + 14, col : col + 14] = 255
    image[mask > 0] = (250, 30, 30)
    return image, mask


def write_dataset(root: Path, layout: str, seed: int = 0, size: int = TINY_IMAGE_SIZE) -> Path:
    """Write a small dataset: ``layout`` 'mvtec' (MVTec AD folders) or 'folder' (train/test/ground_truth)."""
    rng = np.random.default_rng(seed)
    base = root / "bottle" if layout == "mvtec" else root
    mask_suffix = "_mask" if layout == "mvtec" else ""
    for index in range(8):
        (base / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng, size)).save(base / "train" / "good" / f"{index:03d}.png")
    for index in range(6):
        for folder in ("test/good", "test/broken", "ground_truth/broken"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_texture(rng, size)).save(base / "test" / "good" / f"{index:03d}.png")
        image, mask = _defective(rng, size)
        Image.fromarray(image).save(base / "test" / "broken" / f"{index:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth" / "broken" / f"{index:03d}{mask_suffix}.png")
    return root


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec AD-layout dataset with the category 'bottle' (64 x 64 images)."""
    return write_dataset(tmp_path_factory.mktemp("mvtec"), "mvtec")


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder dataset: train/good, test/good, test/broken, ground_truth/broken (64 x 64 images)."""
    return write_dataset(tmp_path_factory.mktemp("folder"), "folder", seed=1)


def write_medical_category(root: Path, category: str, masks: bool, seed: int = 0, size: int = 48) -> Path:
    """A ``<category>_AD`` folder in the medical layout: valid and test splits, 16-bit grey PNG and RGB JPEG.

    Each split holds 6 normal and 6 abnormal images (a bright square); masks in
    ``Ungood/anomaly_mask`` when ``masks`` is set.
    """
    rng = np.random.default_rng(seed)
    for split in ("valid", "test"):
        for label in ("good", "Ungood"):
            (root / f"{category}_AD" / split / label / "img").mkdir(parents=True, exist_ok=True)
            if masks and label == "Ungood":
                (root / f"{category}_AD" / split / label / "anomaly_mask").mkdir(parents=True, exist_ok=True)
            for index in range(6):
                grey = rng.normal(0.4, 0.05, (size, size)).clip(0, 1)
                mask = np.zeros((size, size), np.uint8)
                if label == "Ungood":
                    row, col = rng.integers(4, size - 16, 2)
                    mask[row : row + 12, col : col + 12] = 255
                    grey[mask > 0] = 0.95
                folder = root / f"{category}_AD" / split / label
                if index % 2 == 0:  # 16-bit single-channel PNG
                    name = f"{split}_{label}_{index}.png"
                    Image.fromarray((grey * 65535).astype(np.uint16)).save(folder / "img" / name)
                else:  # 8-bit RGB JPEG with an upper-case suffix
                    name = f"{split}_{label}_{index}.JPEG"
                    rgb = np.stack([(grey * 255).astype(np.uint8)] * 3, axis=-1)
                    Image.fromarray(rgb).save(folder / "img" / name, format="JPEG", quality=95)
                if masks and label == "Ungood":
                    Image.fromarray(mask).save(folder / "anomaly_mask" / name, format="PNG")
    return root / f"{category}_AD"


@pytest.fixture(scope="session")
def medical_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three categories in the medical layout: Brain and Liver with masks, Chest without."""
    root = tmp_path_factory.mktemp("medical")
    write_medical_category(root, "Brain", masks=True, seed=0)
    write_medical_category(root, "Liver", masks=True, seed=1)
    write_medical_category(root, "Chest", masks=False, seed=2)
    return root


def save_checkpoint_file(model: Mvfa, path: Path) -> Path:
    """Write ``model``'s Lightning checkpoint to ``path`` without fitting (as a trainer would)."""
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def folder_datamodule(root: Path) -> Folder:
    """anomalib's Folder datamodule over a dataset written by ``write_dataset(root, "folder")``."""
    return Folder(
        name="scans",
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good",
        abnormal_dir="test/broken",
        mask_dir="ground_truth/broken",
        train_batch_size=4,
        eval_batch_size=4,
        num_workers=0,
        seed=0,
    )


def cpu_engine(root: Path, callbacks: list[Callback] | None = None) -> Engine:
    """anomalib's Engine on the CPU, quiet: no logger, no progress bar."""
    return Engine(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        callbacks=callbacks or [],
    )


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """A headless Chromium (selenium) for a module's tests; they skip with the reason where none is installed."""
    yield from chromium(tmp_path_factory.mktemp("chromium-profile"))
