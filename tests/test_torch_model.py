"""MvfaModel against MVFA's definitions, recomputed independently inside the tests."""

from __future__ import annotations

import math

import pytest
import torch
from anomalib.data import InferenceBatch
from torch.nn import functional as F  # noqa: N812

from anomalib_mvfa import MvfaLoss, MvfaModel, TrainingOutputs, augment_support_set
from anomalib_mvfa.prompting import create_prompt_ensemble

from .conftest import TINY_IMAGE_SIZE

TOLERANCE = 1e-5


def set_known_adapter_weights(model: MvfaModel) -> None:
    """Deterministic, layer-specific adapter weights (not the random initialisation)."""
    for branch_index, adapters in enumerate((model.seg_adapters, model.det_adapters)):
        for layer_index, adapter in enumerate(adapters):
            for fc_index, linear in enumerate((adapter.fc1[0], adapter.fc2[0])):
                count = linear.weight.numel()
                values = torch.linspace(-1.0, 1.0, count).reshape(linear.weight.shape)
                phase = 1 + branch_index + 2 * layer_index + 3 * fc_index
                linear.weight.data = 0.2 * torch.sin(phase * 7.0 * values) / math.sqrt(linear.weight.shape[1])


def reference_tokens(
    model: MvfaModel, images: torch.Tensor, with_class: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Adapted tokens per MVFA.md, written with plain tensor operations on CLIP's own blocks.

    Patch tokens only, or with ``with_class`` the CLS token first and then the patch tokens.
    """
    visual = model.clip.visual
    patches = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride)
    batch, width = patches.shape[:2]
    x = patches.reshape(batch, width, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1).repeat(batch, 1, 1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding)
    blocks = [lambda tokens, block=block: block(tokens.permute(1, 0, 2)).permute(1, 0, 2)  # sequence-first
              for block in visual.transformer.resblocks]  # fmt: skip
    return adapted_through(model, x, blocks, with_class)


def adapted_through(
    model: MvfaModel, x: torch.Tensor, blocks: list, with_class: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run embedded tokens ``x`` through ``blocks`` (callables), with MVFA's adapters written out.

    ``mid = LeakyReLU(x W1)`` is kept per feature layer; after each feature layer
    ``x <- 0.8 x + 0.1 LeakyReLU(mid_seg W2_seg) + 0.1 LeakyReLU(mid_det W2_det)``; the loop stops at the last one.
    """
    seg, det = [], []
    for block_number, block in enumerate(blocks, start=1):
        x = block(x)
        if block_number in model.feature_layers:
            i = model.feature_layers.index(block_number)
            outs = []
            for adapters, store in ((model.seg_adapters, seg), (model.det_adapters, det)):
                mid = F.leaky_relu(x @ adapters[i].fc1[0].weight.T, 0.01)
                outs.append(F.leaky_relu(mid @ adapters[i].fc2[0].weight.T, 0.01))
                store.append(mid if with_class else mid[:, 1:])
            x = 0.8 * x + 0.1 * outs[0] + 0.1 * outs[1]
        if block_number == model.feature_layers[-1]:
            break
    return seg, det


def reference_text_features(model: MvfaModel, class_name: str) -> torch.Tensor:
    columns = []
    for sentences in create_prompt_ensemble(class_name):
        embedded = model.clip.encode_text(model.tokenizer(sentences))
        embedded = embedded / embedded.norm(dim=-1, keepdim=True)
        mean = embedded.mean(dim=0)
        columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def upsample(grid_values: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """``B x L`` -> ``B x size x size`` by bilinear interpolation with aligned corners."""
    grid = grid_values.reshape(grid_values.shape[0], 1, side, side)
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[:, 0]


@pytest.mark.parametrize(
    ("feature_layers", "batch_size"),
    [((4,), 1), ((1, 2, 4), 3), ((1, 2, 3, 4), 2), ((2, 3), 5)],
)
def test_output_shapes(tiny_config, feature_layers, batch_size) -> None:
    torch.manual_seed(0)
    model = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=feature_layers)
    model.setup("bottle", reference_images=torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    images = torch.randn(batch_size, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    size = (batch_size, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)

    outputs = model.branch_outputs(images)
    assert outputs.zero_shot_map.shape == size
    assert outputs.few_shot_map.shape == size
    assert outputs.zero_shot_score.shape == (batch_size,)
    assert outputs.few_shot_score.shape == (batch_size,)
    # the default ("authors") bank holds each image's CLS token beside its 16 patch tokens
    assert model.seg_memory_bank.shape == (len(feature_layers), 3 * (1 + 16), 32)

    prediction = model.eval()(images)
    assert isinstance(prediction, InferenceBatch)
    assert prediction.pred_score.shape == (batch_size,)
    assert prediction.anomaly_map.shape == size

    training = model.train()(images)
    assert isinstance(training, TrainingOutputs)
    assert [t.shape for t in training.segmentation_logits] == [(batch_size, 2, *size[1:])] * len(feature_layers)
    assert [t.shape for t in training.detection_logits] == [(batch_size, 16, 2)] * len(feature_layers)


def test_text_features_follow_the_prompt_ensemble(tiny_model) -> None:
    normal, abnormal = create_prompt_ensemble("bottle")
    assert len(normal) == 7 * 35
    assert len(abnormal) == 5 * 35
    assert "a bad photo of a flawless bottle." in normal
    assert "this is one bottle with damage in the scene." in abnormal
    expected = reference_text_features(tiny_model, "bottle")
    assert tiny_model.text_features.shape == (32, 2)
    assert torch.allclose(tiny_model.text_features, expected, atol=TOLERANCE)


@pytest.mark.parametrize("pipeline", ["authors", "clip"])
def test_branch_outputs_match_mvfa_formulas(tiny_config, pipeline) -> None:
    torch.manual_seed(0)
    model = MvfaModel(
        tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(1, 2, 4), feature_pipeline=pipeline
    )
    model.setup("bottle")
    set_known_adapter_weights(model)
    generator = torch.Generator().manual_seed(1)
    references = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    images = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    model.setup(reference_images=references)
    outputs = model.branch_outputs(images)

    with torch.no_grad():
        text = reference_text_features(model, "bottle")
        seg, det = reference_tokens(model, images)
        # the authors' bank keeps each support image's CLS token, CLIP's use keeps patch tokens only
        memory_seg, memory_det = reference_tokens(model, references, with_class=pipeline == "authors")
        side, size = 4, TINY_IMAGE_SIZE
        zero_shot_map = torch.zeros(3, size, size)
        zero_shot_score = torch.zeros(3)
        few_shot_map = torch.zeros(3, size, size)
        few_shot_score = torch.zeros(3)
        for layer in range(len(model.feature_layers)):
            logits = 100 * (seg[layer] / seg[layer].norm(dim=-1, keepdim=True)) @ text  # B x L x 2
            grid = logits.permute(0, 2, 1).reshape(3, 2, side, side)
            upsampled = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)
            zero_shot_map += torch.softmax(upsampled, dim=1)[:, 1]
            det_logits = 100 * (det[layer] / det[layer].norm(dim=-1, keepdim=True)) @ text
            zero_shot_score += torch.softmax(det_logits, dim=-1)[:, :, 1].mean(dim=1)

            for queries, memory, is_seg in (
                (seg[layer], memory_seg[layer], True),
                (det[layer], memory_det[layer], False),
            ):
                bank = memory.reshape(-1, memory.shape[-1])
                cosine = F.cosine_similarity(queries[:, :, None, :], bank[None, None, :, :], dim=-1)
                distance_map = upsample((1 - cosine).min(dim=-1).values, side, size)
                if is_seg:
                    few_shot_map += distance_map
                else:
                    few_shot_score += distance_map.mean(dim=(1, 2))

    tokens_per_image = 16 + (pipeline == "authors")
    assert model.seg_memory_bank.shape == model.det_memory_bank.shape == (3, 2 * tokens_per_image, 32)
    assert torch.allclose(model.seg_memory_bank[0], F.normalize(memory_seg[0].flatten(0, 1), dim=-1), atol=TOLERANCE)
    assert (outputs.zero_shot_map - zero_shot_map).abs().max() <= TOLERANCE
    assert (outputs.zero_shot_score - zero_shot_score).abs().max() <= TOLERANCE
    assert (outputs.few_shot_map - few_shot_map).abs().max() <= TOLERANCE
    assert (outputs.few_shot_score - few_shot_score).abs().max() <= TOLERANCE


def test_calibration_uses_leave_one_group_out_statistics(tiny_model) -> None:
    model = tiny_model
    set_known_adapter_weights(model)
    support = augment_support_set(torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))
    model.setup(reference_images=support.images, reference_groups=support.groups)

    with torch.no_grad():
        text_only = model.branch_outputs(support.images)  # zero-shot fields do not use the memory bank
        seg, det = reference_tokens(model, support.images)
        bank_seg, bank_det = reference_tokens(model, support.images, with_class=True)  # the default bank
        few_map, few_score = [], []
        for group in range(3):
            inside, outside = support.groups == group, support.groups != group
            group_map = torch.zeros(int(inside.sum()), TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
            group_score = torch.zeros(int(inside.sum()))
            for layer in range(len(model.feature_layers)):
                for tokens, bank_tokens, is_seg in (
                    (seg[layer], bank_seg[layer], True),
                    (det[layer], bank_det[layer], False),
                ):
                    bank = F.normalize(bank_tokens[outside].reshape(-1, tokens.shape[-1]), dim=-1)
                    queries = F.normalize(tokens[inside], dim=-1)
                    distance = upsample(1 - (queries @ bank.T).max(dim=-1).values, 4, TINY_IMAGE_SIZE)
                    if is_seg:
                        group_map += distance
                    else:
                        group_score += distance.mean(dim=(1, 2))
            few_map.append(group_map)
            few_score.append(group_score)
        expected = torch.tensor(
            [
                [values.mean(), values.std()]
                for values in (
                    text_only.zero_shot_score,
                    text_only.zero_shot_map,
                    torch.cat(few_score),
                    torch.cat(few_map),
                )
            ]
        )
    assert torch.allclose(model.calibration, expected, atol=1e-5)

    # forward fuses the two branches as the mean of their z-scores under these statistics
    images = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    raw = model.branch_outputs(images)
    prediction = model.eval()(images)
    z = [
        (value - mean) / std
        for value, (mean, std) in zip(
            (raw.zero_shot_score, raw.zero_shot_map, raw.few_shot_score, raw.few_shot_map), expected, strict=True
        )
    ]
    assert torch.allclose(prediction.pred_score, 0.5 * (z[0] + z[2]), atol=1e-4)
    assert torch.allclose(prediction.anomaly_map, 0.5 * (z[1] + z[3]), atol=1e-4)


def test_zero_shot_only_without_memory_bank(tiny_model) -> None:
    images = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    outputs = tiny_model.branch_outputs(images)
    assert outputs.few_shot_map is None
    assert outputs.few_shot_score is None
    prediction = tiny_model.eval()(images)
    assert torch.equal(prediction.pred_score, outputs.zero_shot_score)
    assert torch.equal(prediction.anomaly_map, outputs.zero_shot_map)


def test_clip_is_frozen_and_one_step_changes_only_adapters(tiny_model) -> None:
    model = tiny_model.train()
    assert not model.clip.training
    assert all(not p.requires_grad for p in model.clip.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    # The last layer's fc2 feeds only blocks that never run: it takes no gradient (and DDP refuses such).
    last = len(model.feature_layers) - 1
    unused = {f"{branch}.{last}.fc2.0.weight" for branch in ("seg_adapters", "det_adapters")}
    assert trainable == {name for name, _ in model.named_parameters() if "adapters" in name} - unused

    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.999))
    masks = torch.zeros(2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    masks[1, 10:30, 20:40] = 1
    seg_loss, det_loss = MvfaLoss()(
        model(torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)), torch.tensor([0, 1]), masks
    )
    (seg_loss + det_loss).backward()
    optimizer.step()

    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if "adapters" in name} - unused


def test_invalid_feature_layers_are_rejected(tiny_config) -> None:
    for layers in ((0, 2), (2, 5), (2, 2), (3, 1), ()):
        with pytest.raises(ValueError, match="feature_layers"):
            MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=layers)


def test_wrong_image_shape_is_rejected(tiny_model) -> None:
    with pytest.raises(ValueError, match=r"B x 3 x 64 x 64.*\(2, 3, 32, 32\)"):
        tiny_model.branch_outputs(torch.randn(2, 3, 32, 32))


def test_missing_text_features_error(tiny_config) -> None:
    model = MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(2, 4))
    with pytest.raises(RuntimeError, match="setup"):
        model.branch_outputs(torch.randn(1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE))


def test_coreset_memory_bank_is_smaller_deterministic_and_never_closer(tiny_config) -> None:
    references = augment_support_set(torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)).images
    images = torch.randn(3, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    distances = []
    for ratio in (1.0, 0.25, 0.25):
        torch.manual_seed(0)
        model = MvfaModel(
            tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(2, 4), memory_bank_ratio=ratio
        )
        model.setup("bottle", reference_images=references)
        assert model.seg_memory_bank.shape[1] == int(22 * 17 * ratio)
        distances.append(model.branch_outputs(images).few_shot_map)
    exact, coreset, again = distances
    assert torch.equal(coreset, again)  # seeded sampler
    assert (coreset >= exact - 1e-6).all()  # a subset's nearest neighbour is never closer
    assert (coreset > exact + 1e-4).any()
    with pytest.raises(ValueError, match="memory_bank_ratio"):
        MvfaModel(tiny_config, pretrained=None, image_size=TINY_IMAGE_SIZE, feature_layers=(2, 4), memory_bank_ratio=0)


def test_bfloat16_search_returns_exact_distances_of_nearly_nearest_neighbours() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(20000, 64, generator=generator), dim=-1)  # 3 chunks of the search
    queries = torch.randn(2, 300, 64, generator=generator)
    found = MvfaModel.nearest_neighbour_distance(queries, bank, precision="bfloat16")
    # independent exact computation: cosine distances to every bank token in float64
    cosine = F.normalize(queries.double(), dim=-1).flatten(0, 1) @ bank.double().T
    exact = (1 - cosine.amax(dim=1)).reshape(2, 300)
    assert found.shape == (2, 300)
    assert (found >= exact - 1e-6).all()  # never closer than the true nearest neighbour
    assert (found - exact).max() < 2e-2  # a miss is a near tie at bfloat16 resolution
    # the returned distance is the exact distance of some bank token
    assert ((1 - cosine - found.flatten()[:, None].double()).abs().amin(dim=1) < 1e-6).all()
    assert torch.allclose(MvfaModel.nearest_neighbour_distance(queries, bank), exact.float(), atol=1e-6)
    with pytest.raises(ValueError, match="precision must be 'float32' or 'bfloat16', got 'int8'"):
        MvfaModel.nearest_neighbour_distance(queries, bank, precision="int8")
    with pytest.raises(ValueError, match="search_precision"):
        MvfaModel("tiny-random", pretrained=None, image_size=TINY_IMAGE_SIZE, search_precision="float16")
