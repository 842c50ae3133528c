"""Shared fixtures: a tiny random open_clip backbone, and no network for the whole run."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from anomalib_mvfa import MvfaModel

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


@pytest.fixture
def tiny_model(tiny_config: Path) -> MvfaModel:
    """A tiny MvfaModel with seeded random CLIP and adapter weights and text features for 'bottle'."""
    torch.manual_seed(0)
    model = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4))
    model.setup("bottle")
    return model
