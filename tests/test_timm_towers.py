"""MVFA on open_clip models with a timm ViT image tower and a Hugging Face text tower (BiomedCLIP's layout).

Every expected value is recomputed here through timm's and open_clip's own code, never through the
package's tower (``embed`` / ``run_blocks`` / ``encode``). The backbone is the tiny one of
``conftest.write_timm_backbone``: timm's ``vit_tiny_patch16_224`` (12 blocks, width 192, random) and a
2-layer BERT, joint dimension 24; at 64 pixels the patch grid is 4 x 4.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants as hub_constants
from open_clip.model import resize_pos_embed
from torch.nn import functional as F  # noqa: N812

from anomalib_mvfa import Mvfa, MvfaModel
from anomalib_mvfa.backbone import PretrainedWeightsError, load_clip, resolve_model_config, tower_depth

from .test_feature_pipeline import check_onnx_scores_as_lightning
from .test_lightning import CONFIGS, EXPORT_TOLERANCE, SMALL_DATA_CLI, checkpoint_of, run_anomalib
from .test_speed import check_fit_equals_the_reference_loop
from .test_torch_model import adapted_through, reference_text_features

SIZE = 64  # grid 4 x 4 with patch 16
SIDE = SIZE // 16
LAYERS = (3, 6, 9, 12)
TOLERANCE = 1e-5  # float32, the same operations in the same order
RELOAD_TOLERANCE = 1e-6
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def timm_model(backbone: Path, feature_layers: tuple[int, ...] = LAYERS) -> MvfaModel:
    return MvfaModel(backbone=str(backbone), pretrained=None, image_size=SIZE, feature_layers=feature_layers)


def randomise_adapters(model: MvfaModel, seed: int) -> None:
    """Seeded Gaussian adapter weights (std 1/sqrt(fan-in)), not the default initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapters in (model.seg_adapters, model.det_adapters):
            for adapter in adapters:
                for linear in (adapter.fc1[0], adapter.fc2[0]):
                    fan_in = linear.weight.shape[1]
                    linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / fan_in**0.5)


def timm_reference_tokens(
    model: MvfaModel, images: torch.Tensor, with_class: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adapted tokens per feature layer through timm's own embedding path and blocks, adapters written out.

    ``mid = LeakyReLU(x W1)`` is scored; after every feature layer but the last
    ``x <- 0.8 x + 0.1 LeakyReLU(mid_seg W2_seg) + 0.1 LeakyReLU(mid_det W2_det)``. Token 0 is the class token.
    """
    trunk = model.clip.visual.trunk
    x = trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(images))))  # timm's path
    return adapted_through(model, x, list(trunk.blocks), with_class)


def upsample(values: torch.Tensor) -> torch.Tensor:
    """``B x K x L`` patch values -> ``B x K x SIZE x SIZE``, bilinear with aligned corners (MVFA's ``to_map``)."""
    grid = values.reshape(values.shape[0], values.shape[1], SIDE, SIDE)
    return F.interpolate(grid, size=(SIZE, SIZE), mode="bilinear", align_corners=True)


# ------------------------------------------------------------------- 1. branch outputs


def test_branch_outputs_match_an_independent_pass_through_the_timm_blocks(timm_backbone) -> None:
    torch.manual_seed(0)
    model = timm_model(timm_backbone)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # timm initialises the class token near zero (std 1e-6): give it weight in attention
        trunk = model.clip.visual.trunk
        trunk.cls_token.copy_(0.5 * torch.randn(trunk.cls_token.shape, generator=generator))
    randomise_adapters(model, seed=1)
    references = torch.rand(3, 3, SIZE, SIZE, generator=generator)
    images = torch.rand(2, 3, SIZE, SIZE, generator=generator)
    model.setup(class_name="brain", reference_images=references)
    with torch.no_grad():
        encoded = reference_text_features(model, "brain")
    assert model.text_features.shape == (24, 2)
    assert (model.text_features - encoded).abs().max() <= TOLERANCE
    # The random BERT averages the 245 normal and 175 abnormal sentences to nearly one direction (cosine
    # 0.9999998), which leaves every zero-shot probability within a few thousandths of 0.5. Score against
    # seeded, clearly different text features instead, so that the maps compared below carry the tokens' values.
    text = F.normalize(torch.randn(24, 2, generator=generator), dim=0)
    model.text_features = text.clone()
    branches = model.eval().score(images).branches

    with torch.no_grad():
        seg, det = timm_reference_tokens(model, images)
        bank_seg, bank_det = timm_reference_tokens(model, references, with_class=True)  # authors' banks: CLS too
        zero_shot_map, zero_shot_score = torch.zeros(2, SIZE, SIZE), torch.zeros(2)
        few_shot_map, few_shot_score = torch.zeros(2, SIZE, SIZE), torch.zeros(2)
        for layer in range(len(LAYERS)):
            logits = 100 * (seg[layer] / seg[layer].norm(dim=-1, keepdim=True)) @ text  # B x L x 2
            zero_shot_map += torch.softmax(upsample(logits.transpose(1, 2)), dim=1)[:, 1]
            det_logits = 100 * (det[layer] / det[layer].norm(dim=-1, keepdim=True)) @ text
            zero_shot_score += torch.softmax(det_logits, dim=-1)[:, :, 1].mean(dim=1)
            for queries, bank_tokens, is_seg in (
                (seg[layer], bank_seg[layer], True),
                (det[layer], bank_det[layer], False),
            ):
                bank = F.normalize(bank_tokens.reshape(-1, bank_tokens.shape[-1]), dim=-1)
                distance = 1 - (F.normalize(queries, dim=-1) @ bank.T).max(dim=-1).values  # B x L
                distance_map = upsample(distance[:, None])[:, 0]
                if is_seg:
                    few_shot_map += distance_map
                else:
                    few_shot_score += distance_map.mean(dim=(1, 2))

    assert len(seg) == len(LAYERS)
    assert seg[0].shape == (2, SIDE * SIDE, 24)
    assert (branches.zero_shot_map - zero_shot_map).abs().max() <= TOLERANCE
    assert (branches.zero_shot_score - zero_shot_score).abs().max() <= TOLERANCE
    assert (branches.few_shot_map - few_shot_map).abs().max() <= TOLERANCE
    assert (branches.few_shot_score - few_shot_score).abs().max() <= TOLERANCE
    assert zero_shot_map.std() > 1e-2  # the compared map varies over the image: the check can fail


# ------------------------------------------------------------ 2. position embedding resize


def test_weights_load_and_the_position_embedding_is_resized_as_open_clip_resizes(timm_backbone, tmp_path) -> None:
    torch.manual_seed(0)
    native, _ = load_clip(timm_backbone, None, 224)
    generator = torch.Generator().manual_seed(3)
    state = {
        key: value + 0.05 * torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in native.state_dict().items()
    }  # away from any initialisation (layer norms start at 1 and 0 under every seed)
    weights = tmp_path / "tiny-timm-224.pt"
    torch.save(state, weights)
    assert state["visual.trunk.pos_embed"].shape == (1, 1 + 14 * 14, 192)

    torch.manual_seed(1)
    clip, _ = load_clip(timm_backbone, str(weights), SIZE)
    loaded = clip.state_dict()
    resized = loaded["visual.trunk.pos_embed"]
    assert resized.shape == (1, 1 + SIDE * SIDE, 192)
    assert tuple(clip.visual.trunk.patch_embed.grid_size) == (SIDE, SIDE)

    # open_clip's own resize of its towers' embedding ((1 + L) x W, class token first), applied to the file's
    expected = {"visual.positional_embedding": state["visual.trunk.pos_embed"][0].clone()}
    resize_pos_embed(expected, SimpleNamespace(visual=SimpleNamespace(grid_size=(SIDE, SIDE))))
    expected_embed = expected["visual.positional_embedding"][None]
    assert (resized - expected_embed).abs().max() <= 1e-6  # the same float32 bicubic, antialiased interpolation
    # the tolerance separates interpolations: open_clip's resize without antialiasing is far off
    plain = {"visual.positional_embedding": state["visual.trunk.pos_embed"][0].clone()}
    resize_pos_embed(plain, SimpleNamespace(visual=SimpleNamespace(grid_size=(SIDE, SIDE))), antialias=False)
    assert (resized - plain["visual.positional_embedding"][None]).abs().max() > 1e-3

    others = [key for key in state if key != "visual.trunk.pos_embed"]
    assert set(loaded) == set(state)
    different = [key for key in others if not torch.equal(loaded[key], state[key])]
    assert different == []
    # and the loaded CLIP runs at 64 pixels through timm's forward
    with torch.no_grad():
        assert clip.encode_image(torch.rand(1, 3, SIZE, SIZE)).shape == (1, 24)


def test_weights_made_at_another_size_load_there_exactly_and_resize_from_there(timm_backbone, tmp_path) -> None:
    """Position embedding for 64 pixels (the config says 224): it loads at 64 as it is, and resizes from 64 to 96."""
    torch.manual_seed(0)
    small, _ = load_clip(timm_backbone, None, SIZE)
    weights = tmp_path / "tiny-timm-64.pt"
    torch.save(small.state_dict(), weights)
    file_embed = small.state_dict()["visual.trunk.pos_embed"]
    at_same, _ = load_clip(timm_backbone, str(weights), SIZE)
    assert torch.equal(at_same.visual.trunk.pos_embed, file_embed)
    larger, _ = load_clip(timm_backbone, str(weights), 96)
    expected = {"visual.positional_embedding": file_embed[0].clone()}
    resize_pos_embed(expected, SimpleNamespace(visual=SimpleNamespace(grid_size=(6, 6))))
    assert (larger.visual.trunk.pos_embed - expected["visual.positional_embedding"][None]).abs().max() <= 1e-6


def test_the_commands_count_the_blocks_of_a_timm_tower(timm_backbone) -> None:
    """demo, speed, loading and scaling pick default feature layers from the depth: a timm config has no ``layers``."""
    clip, _ = load_clip(timm_backbone, None, SIZE)
    assert tower_depth(timm_backbone) == len(clip.visual.trunk.blocks)
    assert tower_depth("tiny-random") == len(load_clip("tiny-random", None, SIZE)[0].visual.transformer.resblocks)


# ------------------------------------------------------- 3. prefix cache and early stop


def test_lightning_fit_on_the_timm_tower_equals_the_reference_loop(
    timm_backbone, tmp_path, mvtec_root, monkeypatch
) -> None:
    # (3, 6, 9) on 12 blocks: blocks 1-3 are cached once, blocks 10-12 are never run by the optimised loop
    model = Mvfa(
        backbone=str(timm_backbone), pretrained=None, image_size=SIZE, feature_layers=(3, 6, 9), k_shot=2, epochs=2
    )
    check_fit_equals_the_reference_loop(model, tmp_path, mvtec_root, monkeypatch)


# ------------------------------------------------------- 4. anomalib train, checkpoint reload


def test_cli_trains_adapters_on_the_timm_tower_and_the_checkpoint_reloads(timm_backbone, folder_root, tmp_path) -> None:
    output = run_anomalib(
        "train", "--config", CONFIGS / "mvfa_folder_few_shot.yaml", "--model.backbone", timm_backbone,
        "--model.pretrained", "null", "--model.image_size", str(SIZE), "--model.feature_layers", "[3,6,9,12]",
        "--model.k_shot", "2", "--model.epochs", "1", *SMALL_DATA_CLI, "--data.root", folder_root,
        "--data.abnormal_dir", "test/broken", "--data.mask_dir", "ground_truth/broken",
        "--trainer.accelerator", "cpu", "--default_root_dir", tmp_path,
    )  # fmt: skip
    assert re.search(r"Mvfa epoch 1/1: loss \d+\.\d+", output), output[-2000:]
    for metric in ("image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"):
        assert re.search(rf"{metric}\s*│\s*\d\.\d+", output), metric
    (adapter_file,) = tmp_path.rglob("mvfa_adapters.pth")
    checkpoint = checkpoint_of(tmp_path)

    loaded = Mvfa.load_from_checkpoint(checkpoint, weights_only=True).eval()
    assert loaded.model.has_memory_bank
    # the same architecture; CLIP (random, kept in the checkpoint), text features and memory banks from the
    # checkpoint; the adapters from the adapter file only
    reference = Mvfa(
        backbone=str(timm_backbone), pretrained=None, image_size=SIZE, feature_layers=LAYERS, k_shot=2, epochs=1
    ).eval()
    untrained = {b: {k: v.clone() for k, v in part.items()} for b, part in reference.model.adapter_state_dict().items()}
    kept = {
        key: value
        for key, value in loaded.model.state_dict().items()
        if not key.startswith(("seg_adapters.", "det_adapters."))
    }
    reference.model.load_state_dict(kept, strict=False)
    reference.model.load_adapters(adapter_file)
    trained = reference.model.adapter_state_dict()
    moved = max((trained[b][k] - untrained[b][k]).abs().max().item() for b in trained for k in trained[b])
    assert moved > 1e-4  # the file holds trained adapters, not the initial ones: the comparison can fail

    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    expected, actual = reference.model.score(images), loaded.model.score(images)
    assert (actual.pred_score - expected.pred_score).abs().max() <= RELOAD_TOLERANCE
    assert (actual.anomaly_map - expected.anomaly_map).abs().max() <= RELOAD_TOLERANCE
    assert (actual.branches.zero_shot_map - expected.branches.zero_shot_map).abs().max() <= RELOAD_TOLERANCE
    assert (actual.branches.few_shot_score - expected.branches.few_shot_score).abs().max() <= RELOAD_TOLERANCE


# ------------------------------------------------------------------------- 5. ONNX export


def test_onnx_export_of_the_timm_tower_scores_as_the_lightning_model(timm_backbone, tmp_path) -> None:
    torch.manual_seed(0)
    model = Mvfa(
        backbone=str(timm_backbone), pretrained=None, image_size=SIZE, feature_layers=LAYERS, epochs=0, k_shot=0,
        class_name="brain",
    ).eval()  # fmt: skip
    model.setup()
    randomise_adapters(model.model, seed=5)
    check_onnx_scores_as_lightning(model, tmp_path, EXPORT_TOLERANCE)


# ---------------------------------------------------------------------------- 6. refusals


@pytest.mark.parametrize(
    ("timm_model_name", "missing"),
    [
        ("resnet18", r"its timm image tower is a ResNet, not a timm VisionTransformer"),
        ("vit_small_patch14_reg4_dinov2", r"its timm ViT has 4 register token\(s\) besides the class token"),
    ],
)
def test_timm_towers_mvfa_cannot_use_are_refused_by_name(timm_backbone, tmp_path, timm_model_name, missing) -> None:
    config = json.loads(Path(timm_backbone).read_text())
    config["vision_cfg"]["timm_model_name"] = timm_model_name
    path = tmp_path / f"unfit-{timm_model_name}.json"
    path.write_text(json.dumps(config))
    pattern = rf"Backbone 'unfit-{timm_model_name}' cannot carry MVFA's adapters: {missing}"
    with pytest.raises(ValueError, match=pattern):
        MvfaModel(backbone=str(path), pretrained=None, image_size=SIZE, feature_layers=LAYERS)
    with pytest.raises(ValueError, match=pattern):
        load_clip(path, None, SIZE)


# ---------------------------------------------------------------------- 7. offline hf-hub


def _cache_hub_file(cache: Path, repository: str, filename: str, text: str) -> None:
    """Put ``filename`` of ``repository`` into a Hugging Face cache folder, in huggingface_hub's layout."""
    folder = cache / f"models--{repository.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / filename).write_text(text)


def test_an_hf_hub_backbone_fails_fast_offline_naming_files_and_the_local_alternative(
    timm_backbone, tmp_path, monkeypatch
) -> None:
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    # huggingface_hub reads the environment when it is imported: point the loaded module at the empty cache too
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(empty))

    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as raised:
        load_clip(BIOMEDCLIP, "openai", 224)
    elapsed = time.perf_counter() - started
    assert elapsed < 10.0
    message = str(raised.value)
    assert "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in message
    assert "open_clip_config.json" in message
    assert "--model.backbone" in message
    assert "--model.pretrained" in message

    # the look-up really goes to the patched cache: a config placed there is found (so the failure above
    # was not decided by a file elsewhere on this machine)
    config = {"model_cfg": json.loads(Path(timm_backbone).read_text())}
    _cache_hub_file(empty, BIOMEDCLIP.removeprefix("hf-hub:"), "open_clip_config.json", json.dumps(config))
    name, found = resolve_model_config(BIOMEDCLIP)
    assert name == "BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert found == config["model_cfg"]
    # a cache folder of the user's own is looked in too (load_clip's cache_dir)
    own = tmp_path / "own-cache"
    _cache_hub_file(own, "someorg/tiny-timm", "open_clip_config.json", json.dumps(config))
    assert resolve_model_config("hf-hub:someorg/tiny-timm", cache_dir=str(own))[1] == config["model_cfg"]
    with pytest.raises(PretrainedWeightsError, match="someorg/tiny-timm"):
        resolve_model_config("hf-hub:someorg/tiny-timm")  # not in the default cache
