"""The tiny CLIP trained here (``tests/fixtures/make_tiny_clip.py``): current, and loadable through the package."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from anomalib_mvfa import MvfaModel
from anomalib_mvfa.backbone import load_clip

from .fixtures.make_tiny_clip import CONFIG_PATH, MANIFEST_PATH, WEIGHTS_PATH, file_digest, source_digest
from .fixtures.tiny_clip_data import IMAGE_SIZE

FEATURE_LAYERS = (1, 2, 3, 4)
STALE = "the tiny CLIP fixture is stale: run python tests/fixtures/make_tiny_clip.py"


def test_fixture_is_current() -> None:
    manifest = json.loads(MANIFEST_PATH.read_text())
    assert manifest["sources_sha256"] == source_digest(), STALE
    assert manifest["weights_sha256"] == file_digest(WEIGHTS_PATH), STALE
    assert manifest["config_sha256"] == file_digest(CONFIG_PATH), STALE


def test_weights_load_through_the_package() -> None:
    stored = load_file(str(WEIGHTS_PATH))
    clip, tokenizer = load_clip(str(CONFIG_PATH), str(WEIGHTS_PATH), IMAGE_SIZE)
    assert all(torch.equal(value, stored[key].float()) for key, value in clip.state_dict().items())
    assert tokenizer(["a photo of a damaged Liver."]).shape == (1, 77)
    model = MvfaModel(CONFIG_PATH, pretrained=WEIGHTS_PATH, image_size=IMAGE_SIZE, feature_layers=FEATURE_LAYERS)
    assert model.grid_size == (8, 8)
    assert torch.equal(model.clip.visual.proj, stored["visual.proj"].float())
