"""CLIP loading: local weight files, random weights, offline tags, real architectures."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from anomalib_mvfa import Mvfa, MvfaModel, PretrainedWeightsError, backbone
from anomalib_mvfa.backbone import load_clip

from .conftest import TINY_CONFIG, TINY_IMAGE_SIZE


def test_random_weights_warn_loudly(tiny_config, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        load_clip(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE)
    assert "RANDOM weights" in caplog.text
    assert "meaningless" in caplog.text


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_weights_file_loads_exactly(tiny_config, tmp_path, suffix) -> None:
    torch.manual_seed(5)
    source = open_clip.CLIP(**TINY_CONFIG)
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    clip, _ = load_clip(tiny_config, pretrained=str(path), image_size=TINY_IMAGE_SIZE)
    loaded = clip.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())
    assert all(not p.requires_grad for p in clip.parameters())


def test_position_embedding_is_resized_for_another_image_size(tiny_config, tmp_path) -> None:
    torch.manual_seed(5)
    source = open_clip.CLIP(**TINY_CONFIG)  # 64 px, 4 x 4 patches
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    clip, _ = load_clip(tiny_config, pretrained=tmp_path / "weights.pt", image_size=96)  # 6 x 6 patches
    old = source.visual.positional_embedding.detach()
    new = clip.visual.positional_embedding
    assert new.shape == (1 + 36, 48)
    assert torch.equal(new[0], old[0])  # class token position unchanged
    grid = old[1:].reshape(1, 4, 4, 48).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(new[1:], expected.permute(0, 2, 3, 1).reshape(36, 48), atol=1e-6)


def test_weights_that_do_not_fit_are_refused(tiny_config, tmp_path) -> None:
    other = dict(TINY_CONFIG, embed_dim=16)
    torch.save(open_clip.CLIP(**other).state_dict(), tmp_path / "other.pt")
    with pytest.raises(PretrainedWeightsError, match=r"do not fit backbone 'tiny-clip'"):
        load_clip(tiny_config, pretrained=tmp_path / "other.pt", image_size=TINY_IMAGE_SIZE)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_clip(tiny_config, pretrained=tmp_path / "missing.pt", image_size=TINY_IMAGE_SIZE)


@pytest.mark.parametrize("tag", ["openai", "laion2b_s34b_b88k"])  # a URL download and a Hugging Face one
def test_pretrained_tag_offline_fails_fast_with_instructions(tag, tmp_path) -> None:
    started = time.monotonic()
    with pytest.raises(PretrainedWeightsError) as error:
        load_clip("ViT-B-16", pretrained=tag, image_size=224, cache_dir=str(tmp_path))
    message = str(error.value)
    assert f"'{tag}'" in message
    assert "ViT-B-16" in message
    assert "pretrained='/path/to/" in message
    print(f"offline failure after {time.monotonic() - started:.2f} s")


def test_unknown_tag_and_unknown_backbone(tiny_config) -> None:
    with pytest.raises(PretrainedWeightsError, match=r"Unknown pretrained tag 'laion9000'.*openai"):
        load_clip("ViT-B-16", pretrained="laion9000", image_size=224)
    with pytest.raises(ValueError, match=r"Unknown backbone 'ViT-B-61'.*Close names: .*ViT-B-16"):
        load_clip("ViT-B-61", pretrained=None, image_size=224)


def test_config_file_that_is_not_a_clip_config(tmp_path) -> None:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"vision_cfg": {}}))
    with pytest.raises(ValueError, match=r"broken\.json.*embed_dim"):
        load_clip(path, pretrained=None, image_size=64)


@pytest.mark.parametrize(
    ("backbone", "width", "embed_dim", "depth"),
    [("ViT-B-16", 768, 512, 12), ("ViT-B-16-plus-240", 896, 640, 12), ("ViT-L-14-336", 1024, 768, 24)],
)
def test_real_architectures_size_their_adapters(backbone, width, embed_dim, depth) -> None:
    layers = (depth // 4, depth // 2, depth)
    patch = 14 if "L-14" in backbone else 16
    model = MvfaModel(backbone, pretrained=None, image_size=4 * patch, feature_layers=layers)
    assert model.depth == depth
    assert model.grid_size == (4, 4)
    assert model.seg_adapters[0].fc1[0].weight.shape == (embed_dim, width)
    assert model.det_adapters[-1].fc2[0].weight.shape == (width, embed_dim)
    model.text_features = torch.nn.functional.normalize(torch.randn(embed_dim, 2), dim=0)  # skip the text tower
    outputs = model.branch_outputs(torch.randn(1, 3, 4 * patch, 4 * patch))
    assert outputs.zero_shot_map.shape == (1, 4 * patch, 4 * patch)


def test_paper_default_grid_for_vit_l_14_336_at_240() -> None:
    clip, _ = load_clip("ViT-L-14-336", pretrained=None, image_size=240)
    assert tuple(clip.visual.grid_size) == (17, 17)
    assert clip.visual.positional_embedding.shape == (1 + 17 * 17, 1024)


def test_a_hub_config_file_gives_its_model_and_its_images_mean_and_std(tmp_path) -> None:
    """open_clip_config.json of the Hugging Face Hub: ``model_cfg`` builds, ``preprocess_cfg`` normalises ("clip")."""
    model_cfg = json.loads((Path(backbone.__file__).parent / "backbones" / "tiny-random.json").read_text())
    mean, std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]
    path = tmp_path / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std}}))
    _, config = backbone.resolve_model_config(path)
    assert config["embed_dim"] == model_cfg["embed_dim"]
    assert backbone.image_statistics(path) == (tuple(mean), tuple(std))
    assert backbone.image_statistics("tiny-random") == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    images = torch.rand(1, 3, 64, 64)
    normalised = (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    for pipeline, expected in (("clip", normalised), ("authors", images)):
        model = Mvfa(
            backbone=str(path), pretrained=None, image_size=64, feature_layers=(1, 2, 4), feature_pipeline=pipeline
        )
        torch.testing.assert_close(model.pre_processor.transform(images), expected, atol=1e-6, rtol=0)
