"""Files written by 0.2.0.dev0 (commit d7781a4) load and score as they did: checkpoint, adapter file, support record.

The fixtures in ``tests/fixtures/v0_2`` were made once by ``tests/fixtures/make_v0_2_fixtures.py`` with the
code of that commit: a tiny few-shot Mvfa trained for one epoch, and its scores of three fixed images.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from anomalib.data import InferenceBatch, PredictDataset
from PIL import Image
from torch.utils.data import DataLoader

from anomalib_mvfa import Mvfa, MvfaModel

from .conftest import cpu_engine

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
TOLERANCE = 1e-6  # relative and absolute: the same float32 computation, possibly reordered


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURES / "expected_scores.pt", weights_only=True)


def test_checkpoint_of_0_2_scores_as_it_did(expected: dict[str, torch.Tensor]) -> None:
    model = Mvfa.load_from_checkpoint(FIXTURES / "model.ckpt").eval()
    assert model.has_memory_bank  # the few-shot banks and calibration travel in the checkpoint
    scores = model.score_images(expected["images"])
    torch.testing.assert_close(scores.pred_score, expected["pred_score"], rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(scores.anomaly_map, expected["anomaly_map"], rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(scores.branches.zero_shot_score, expected["zero_shot_score"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores.branches.few_shot_score, expected["few_shot_score"], rtol=1e-6, atol=1e-6)


def test_adapter_file_of_0_2_holds_the_checkpoint_adapters_and_scores_alike(
    expected: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    checkpoint = torch.load(FIXTURES / "model.ckpt", weights_only=True)
    model = Mvfa.load_from_checkpoint(FIXTURES / "model.ckpt").eval()
    # the same CLIP, other adapters: the file must bring the trained ones back
    torch.manual_seed(123)
    fresh = MvfaModel("tiny-random", pretrained=None, image_size=64, feature_layers=(1, 2, 4))
    fresh.clip.load_state_dict(model.model.clip.state_dict())
    fresh.load_adapters(FIXTURES / "mvfa_adapters.pth")
    for branch in ("seg_adapters", "det_adapters"):
        for key, value in getattr(fresh, branch).state_dict().items():
            torch.testing.assert_close(value, checkpoint["state_dict"][f"model.{branch}.{key}"], rtol=0, atol=0)
    fresh.text_features = model.model.text_features.clone()  # the prompts of the checkpoint
    fresh.eval()
    zero_shot = fresh.score(model.preprocess(expected["images"])).branches.zero_shot_score
    torch.testing.assert_close(zero_shot, expected["zero_shot_score"], rtol=TOLERANCE, atol=TOLERANCE)


def test_checkpoint_of_0_2_predicts_through_anomalib(expected: dict[str, torch.Tensor], tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(expected["images"]):  # 8-bit images: the PNG round trip is exact
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(array).save(folder / f"{index}.png")
    engine = cpu_engine(tmp_path / "results")
    model = Mvfa(backbone="tiny-random", pretrained=None, image_size=64, feature_layers=(1, 2, 4), k_shot=2, epochs=1)
    dataset = PredictDataset(folder, image_size=None)
    loader = DataLoader(dataset, batch_size=3, collate_fn=dataset.collate_fn)
    predictions = engine.predict(model, dataloaders=loader, ckpt_path=FIXTURES / "model.ckpt")
    predicted = torch.cat([batch.pred_score for batch in predictions])
    # anomalib post-processes with the checkpoint's thresholds and normalisation: apply them to the 0.2 scores
    loaded = Mvfa.load_from_checkpoint(FIXTURES / "model.ckpt").eval()
    reference = loaded.post_processor(
        InferenceBatch(pred_score=expected["pred_score"].clone(), anomaly_map=expected["anomaly_map"].clone())
    )
    torch.testing.assert_close(predicted, reference.pred_score, rtol=TOLERANCE, atol=TOLERANCE)


def test_support_record_of_0_2_lists_what_the_checkpoint_recorded() -> None:
    record = json.loads((FIXTURES / "support_set.json").read_text())
    assert record["k_shot"] == 2
    assert len(record["normal"]) == record["k_shot"] == len(record["abnormal"])
    checkpoint = torch.load(FIXTURES / "model.ckpt", weights_only=True)
    states = [state for key, state in checkpoint["callbacks"].items() if "selected_files" in state]
    assert [state["selected_files"]["normal"] for state in states] == [record["normal"]]
