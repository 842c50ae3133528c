"""The two feature pipelines: pre-processing, CLIP activation, memory banks, checkpoints, export."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import pytest
import torch
from anomalib.pre_processing.utils.transform import get_exportable_transform
from PIL import Image
from torch.nn import functional as F  # noqa: N812

from anomalib_mvfa import Mvfa, MvfaModel
from anomalib_mvfa.backbone import load_clip, runs_quick_gelu
from anomalib_mvfa.data import read_image as read_image_file
from anomalib_mvfa.pipeline import uses_quick_gelu

from .conftest import TINY_CONFIG, TINY_IMAGE_SIZE, save_checkpoint_file

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's published statistics, written out here
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_MODEL = {"backbone": "tiny-random", "pretrained": None, "image_size": TINY_IMAGE_SIZE, "feature_layers": (1, 2, 4)}


# ------------------------------------------------------------------ pre-processing


def _photo(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size[0])[None, :, None] * np.ones((size[1], 1, 3))
    image = np.clip(ramp + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path)
    return path


def _authors_input(path: Path, size: int) -> torch.Tensor:
    """What the authors' dataset gives CLIP: PIL bicubic resize of the RGB image, then ToTensor."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.mark.parametrize("file_size", [(64, 64), (200, 150)])
def test_authors_pre_processing_is_the_resized_image_as_to_tensor_gives_it(tmp_path, file_size) -> None:
    path = _photo(tmp_path / "scan.png", file_size)
    model = Mvfa(**TINY_MODEL, epochs=0)  # default feature pipeline
    ours = model.pre_processor.transform(read_image_file(path)[None])[0]
    expected = _authors_input(path, TINY_IMAGE_SIZE)
    # Same size: no resize, values equal. Resized: PIL resizes 8-bit images in two passes and rounds
    # to 1/255 steps after each; we keep floats (and the precision of 16-bit files). On this noisy
    # image that leaves at most about 2 steps at single pixels and a third of a step on average.
    if file_size == (64, 64):
        assert (ours - expected).abs().max() <= 1e-6
    else:
        assert (ours - expected).abs().max() <= 3 / 255
        assert (ours - expected).abs().mean() <= 0.5 / 255


def test_clip_pre_processing_normalises_with_clip_statistics(tmp_path) -> None:
    path = _photo(tmp_path / "scan.png", (200, 150))
    model = Mvfa(**TINY_MODEL, epochs=0, feature_pipeline="clip")
    ours = model.pre_processor.transform(read_image_file(path)[None])[0]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (_authors_input(path, TINY_IMAGE_SIZE) - mean) / std
    assert (ours - expected).abs().max() <= 3 / 255 / min(CLIP_STD)
    assert (ours - expected).abs().mean() <= 0.5 / 255 / min(CLIP_STD)


def test_exported_pre_processing_resizes_as_training_and_inference_do() -> None:
    model = Mvfa(**TINY_MODEL, epochs=0)
    full_size = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    lightning_path = model.pre_processor.transform(full_size)  # what Engine.fit/test/predict apply
    exported_path = model.pre_processor(full_size)  # what to_torch/to_onnx/to_openvino trace
    assert (exported_path - lightning_path).abs().max() < 1e-5
    # anomalib's own export transform (resize without antialiasing) is far off: the test can fail
    stock = get_exportable_transform(model.pre_processor.transform)(full_size)
    assert (stock - lightning_path).abs().max() > 1e-2


def test_onnx_model_scores_a_full_size_image_as_the_lightning_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = Mvfa(**TINY_MODEL, epochs=0, k_shot=0, class_name="bottle").eval()
    model.setup()
    check_onnx_scores_as_lightning(model, tmp_path, 1e-4)


def check_onnx_scores_as_lightning(model: Mvfa, tmp_path, tolerance: float) -> None:
    """The exported ONNX model scores a 256-pixel image as the Lightning path does, within ``tolerance``."""
    path = model.to_onnx(tmp_path)
    full_size = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the Lightning path: PreProcessor.transform, torch model, post-processor
        expected = model.post_processor(model.model(model.pre_processor.transform(full_size)))
    session = onnxruntime.InferenceSession(str(path))
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, {"input": full_size.numpy()}), strict=True))
    assert np.abs(outputs["pred_score"] - expected.pred_score.numpy()).max() < tolerance
    assert np.abs(outputs["anomaly_map"] - expected.anomaly_map.numpy()).max() < tolerance


# ---------------------------------------------------------------------- activation


def _openai_archive(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """A tiny CLIP saved as a TorchScript archive, the format of OpenAI's releases; returns its weights."""
    torch.manual_seed(7)
    model = open_clip.CLIP(**config, quick_gelu=True).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # layer norms away from identity
    torch.jit.save(torch.jit.script(model), str(path))
    return {key: value.clone() for key, value in model.state_dict().items()}


def _independent_image_embedding(
    weights: dict[str, torch.Tensor],
    images: torch.Tensor,
    quick_gelu: bool,
    heads: int,
    layers: int,
    positional: torch.Tensor,
) -> torch.Tensor:
    """CLIP's image tower written out with tensor operations, with the given activation."""
    w = {key.removeprefix("visual."): value for key, value in weights.items() if key.startswith("visual.")}
    x = F.conv2d(images, w["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([w["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + positional
    x = F.layer_norm(x, x.shape[-1:], w["ln_pre.weight"], w["ln_pre.bias"])
    width = x.shape[-1]
    for index in range(layers):
        b = f"transformer.resblocks.{index}."
        h = F.layer_norm(x, (width,), w[b + "ln_1.weight"], w[b + "ln_1.bias"])
        q, k, v = (h @ w[b + "attn.in_proj_weight"].T + w[b + "attn.in_proj_bias"]).split(width, dim=-1)
        split = [t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v)]
        attention = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        mixed = (attention @ split[2]).transpose(1, 2).reshape(x.shape)
        x = x + mixed @ w[b + "attn.out_proj.weight"].T + w[b + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), w[b + "ln_2.weight"], w[b + "ln_2.bias"])
        h = h @ w[b + "mlp.c_fc.weight"].T + w[b + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h) if quick_gelu else 0.5 * h * (1 + torch.erf(h / 2**0.5))
        x = x + h @ w[b + "mlp.c_proj.weight"].T + w[b + "mlp.c_proj.bias"]
    pooled = F.layer_norm(x[:, 0], (width,), w["ln_post.weight"], w["ln_post.bias"])
    return pooled @ w["proj"]


def test_openai_archive_at_a_non_native_size_runs_gelu_under_authors_and_quick_gelu_under_clip(tmp_path) -> None:
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 2}}
    config_path = tmp_path / "tiny-openai.json"
    config_path.write_text(json.dumps(config))
    archive = tmp_path / "tiny-openai.pt"
    weights = _openai_archive(archive, config)
    size = 96  # native 64: as the paper's ViT-L-14-336 at 240
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    embeddings = {}
    for pipeline, quick in (("authors", False), ("clip", True)):
        clip, _ = load_clip(config_path, str(archive), size, feature_pipeline=pipeline)
        assert runs_quick_gelu(clip) is quick
        with torch.no_grad():
            embeddings[pipeline] = clip.encode_image(images)
            heads = config["vision_cfg"]["width"] // config["vision_cfg"]["head_width"]
            expected = _independent_image_embedding(
                weights, images, quick, heads, layers=2, positional=clip.visual.positional_embedding
            )
        assert (embeddings[pipeline] - expected).abs().max() < 1e-4
    assert (embeddings["authors"] - embeddings["clip"]).abs().max() > 1e-3  # the activation matters


@pytest.mark.parametrize(
    ("pipeline", "openai", "size", "config_quick", "expected"),
    [
        ("authors", True, 240, False, False),  # the paper: ViT-L-14-336 at 240, rebuilt from the config
        ("authors", True, 336, False, True),  # native size: the authors' OpenAI loader (QuickGELU)
        ("authors", False, 240, True, True),  # other weights: the config decides
        ("authors", False, 240, False, False),
        ("clip", True, 240, False, True),  # OpenAI weights were trained with QuickGELU
        ("clip", False, 240, False, False),
        ("clip", False, 240, True, True),
    ],
)
def test_activation_rule_mirrors_each_branch(pipeline, openai, size, config_quick, expected) -> None:
    config = {"vision_cfg": {"image_size": 336}, "quick_gelu": config_quick}
    assert uses_quick_gelu(pipeline, config, openai_weights=openai, image_size=size) is expected


# ------------------------------------------------------------------ memory banks


def test_memory_banks_hold_cls_tokens_under_authors_only(tiny_config) -> None:
    references = torch.rand(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    banks = {}
    for pipeline in ("authors", "clip"):
        torch.manual_seed(0)
        model = MvfaModel(
            tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(2, 4), feature_pipeline=pipeline
        )
        model.setup("bottle", reference_images=references)
        banks[pipeline] = model.det_memory_bank
        tokens = model.encode_batched(references)
    patches = 16
    assert banks["clip"].shape == (2, 3 * patches, 32)
    assert banks["authors"].shape == (2, 3 * (1 + patches), 32)
    # authors: per image, its CLS token then its patch tokens; the patch tokens are the clip bank's
    authors = banks["authors"].reshape(2, 3, 1 + patches, 32)
    assert torch.allclose(authors[:, :, 1:].flatten(1, 2), banks["clip"], atol=1e-6)
    cls_tokens = torch.stack([F.normalize(layer, dim=-1) for layer in tokens.detection_class])
    assert torch.allclose(authors[:, :, 0], cls_tokens, atol=1e-6)


# -------------------------------------------------------------------- checkpoints


def test_checkpoint_keeps_the_pipeline_and_refuses_a_conflicting_one(tmp_path) -> None:
    torch.manual_seed(0)
    model = Mvfa(**TINY_MODEL, epochs=0, k_shot=0, class_name="bottle", feature_pipeline="clip")
    model.setup()
    path = save_checkpoint_file(model, tmp_path / "clip.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["mvfa_feature_pipeline"] == "clip"

    loaded = Mvfa.load_from_checkpoint(path)
    assert loaded.feature_pipeline == "clip"
    assert [type(t).__name__ for t in loaded.pre_processor.transform.transforms] == ["Resize", "Normalize"]
    assert not loaded.model.bank_class_tokens

    # a model left at its default (as `anomalib test --ckpt_path` builds one) takes the checkpoint's setting
    default = Mvfa(**TINY_MODEL, epochs=0, k_shot=0, class_name="bottle")
    assert default.feature_pipeline == "authors"
    default.on_load_checkpoint(checkpoint)
    assert default.feature_pipeline == "clip"
    assert [type(t).__name__ for t in default.pre_processor.transform.transforms] == ["Resize", "Normalize"]
    images = torch.rand(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    default.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        assert torch.allclose(default.eval()(images).pred_score, model.eval()(images).pred_score, atol=1e-6)

    with pytest.raises(ValueError, match=r"made with feature_pipeline='clip', but feature_pipeline='authors'"):
        Mvfa.load_from_checkpoint(path, feature_pipeline="authors")


def test_checkpoint_without_a_record_is_the_earlier_clip_pipeline(tmp_path) -> None:
    model = Mvfa(**TINY_MODEL, epochs=0, k_shot=0, class_name="bottle", feature_pipeline="clip")
    model.setup()
    checkpoint = torch.load(save_checkpoint_file(model, tmp_path / "old.ckpt"), map_location="cpu", weights_only=True)
    del checkpoint["mvfa_feature_pipeline"]
    checkpoint["hyper_parameters"].pop("feature_pipeline")
    default = Mvfa(**TINY_MODEL, epochs=0, k_shot=0)
    default.on_load_checkpoint(checkpoint)
    assert default.feature_pipeline == "clip"


def test_unknown_pipeline_is_refused() -> None:
    with pytest.raises(ValueError, match=r"feature_pipeline must be one of 'authors', 'clip', got 'openai'"):
        Mvfa(**TINY_MODEL, feature_pipeline="openai")


# ---------------------------------------------------------------- adapter files


def test_adapters_of_the_other_pipeline_warn_once_naming_the_setting(tiny_config, tmp_path, caplog) -> None:
    authors = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4))
    released = tmp_path / "Liver.pth"  # the authors' release format: the two adapter keys only
    torch.save(authors.adapter_state_dict(), released)
    ours = authors.save_adapters(tmp_path / "ours.pth")
    clip = MvfaModel(
        tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4), feature_pipeline="clip"
    )
    for path in (released, ours):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            clip.load_adapters(path)
            clip.load_adapters(path)
        messages = [record.getMessage() for record in caplog.records if "feature_pipeline" in record.getMessage()]
        assert len(messages) == 1, messages
        assert f"'{path}' was trained under feature_pipeline='authors'" in messages[0]
        assert "this model runs feature_pipeline='clip'" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        authors.load_adapters(released)  # the right setting: silent
        authors.load_adapters(ours)
    assert not [record for record in caplog.records if "feature_pipeline" in record.getMessage()]
