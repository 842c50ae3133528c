"""A callback that keeps what any anomalib model scored on the test split, image by image.

anomalib's post-processor (a callback of the model) normalises scores and maps and sets the
decisions during the same round of batch-end hooks as this one, possibly after it; so each batch
is read twice: its raw scores when it ends, everything else once the next batch ends (or the test
ends), when the post-processor is done with it. The recorded scores are those anomalib's metrics
see (normalised), beside the raw ones.

Example:
    >>> recorder = TestRecorder(maps_dir="results/maps")
    >>> engine = Engine(callbacks=[recorder])  # doctest: +SKIP
    >>> engine.test(model, datamodule=datamodule)  # doctest: +SKIP
    >>> recorder.save_maps()  # doctest: +SKIP
    >>> recorder.rows[0]["score"]  # doctest: +SKIP
    0.73
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from .results import PIXEL_CURVE_SAMPLE, finite_or_none, pixel_summary, save_maps


class TestRecorder(Callback):
    """Per-image rows, saved maps and a pixel sample of one test run (see the module docstring).

    Args:
        maps_dir: Folder of the saved anomaly maps (``.npy``, float16), ``None`` to save none.
        pixel_limit: Pixels of the whole split kept for pixel-level curves at most (a seeded
            sample of the same number of pixels per image; all pixels when they are fewer).
        seed: Seed of the pixel sample.

    Attributes:
        rows: One dict per test image: ``file``, ``label``, ``score`` (as anomalib's metrics see it),
            ``raw_score``, ``threshold`` (of ``score``), ``decision``, ``map``, ``mask``, ``pixel_threshold``
            (of the map).
        pixel_scores, pixel_targets: The pixel sample (1-D), empty without masks.
    """

    def __init__(
        self, maps_dir: str | Path | None = None, pixel_limit: int = PIXEL_CURVE_SAMPLE, seed: int = 0
    ) -> None:
        super().__init__()
        self.maps_dir = Path(maps_dir) if maps_dir is not None else None
        self.pixel_limit = pixel_limit
        self.seed = seed
        self.rows: list[dict[str, object]] = []
        self._pixel_scores: list[torch.Tensor] = []
        self._pixel_targets: list[torch.Tensor] = []
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self._maps: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._pixel_threshold: float | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._per_image: int | None = None

    @property
    def pixel_scores(self) -> torch.Tensor:
        """Sampled anomaly-map values of every image with a mask."""
        return torch.cat(self._pixel_scores) if self._pixel_scores else torch.empty(0)

    @property
    def pixel_targets(self) -> torch.Tensor:
        """Mask values (0/1) at the sampled pixels."""
        return torch.cat(self._pixel_targets) if self._pixel_targets else torch.empty(0, dtype=torch.long)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Start empty; size the per-image pixel sample from the test split's length."""
        del pl_module
        self.rows.clear()
        self._pixel_scores.clear()
        self._pixel_targets.clear()
        self._maps.clear()
        self._masks.clear()
        self._generator.manual_seed(self.seed)
        test_data = getattr(getattr(trainer, "datamodule", None), "test_data", None)
        self._per_image = (
            math.ceil(self.pixel_limit / len(test_data)) if test_data is not None and len(test_data) else None
        )

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *args: Any, **kwargs: Any) -> None:
        """Take the raw scores now; read the rest when the post-processor is done (next batch, or the end)."""
        del args, kwargs
        self._flush(pl_module)
        if outputs is not None and getattr(outputs, "pred_score", None) is not None:
            self._pending.append((outputs, outputs.pred_score.detach().float().cpu().reshape(-1).clone()))

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Read the last batch."""
        del trainer
        self._flush(pl_module)

    def _flush(self, pl_module: Any) -> None:
        for batch, raw in self._pending:
            self._record(batch, raw, pl_module)
        self._pending = []

    def _record(self, batch: Any, raw: torch.Tensor, pl_module: Any) -> None:
        files = [str(path) for path in batch.image_path]
        scores = batch.pred_score.detach().float().cpu().reshape(-1)
        labels = batch.gt_label.detach().cpu().reshape(-1).long()
        decisions = None if batch.pred_label is None else batch.pred_label.detach().cpu().reshape(-1).long()
        maps = None if batch.anomaly_map is None else batch.anomaly_map.detach().float().cpu()
        maps = None if maps is None else maps.reshape(maps.shape[0], *maps.shape[-2:])
        masks = getattr(batch, "gt_mask", None)
        if maps is not None and self.maps_dir is not None:
            self._maps.append(maps.to(torch.float16))  # written by save_maps, after the timed test
            if masks is not None and masks[0].numel() == maps[0].numel():
                self._masks.append(masks.detach().cpu().reshape(maps.shape).bool())
        mask_paths = getattr(batch, "mask_path", None) or [""] * len(files)
        threshold = _threshold(pl_module, "image")
        self._pixel_threshold = _threshold(pl_module, "pixel")
        for index, file in enumerate(files):
            self.rows.append(
                {
                    "file": file,
                    "label": int(labels[index]),
                    "score": float(scores[index]),
                    "raw_score": float(raw[index]),
                    "threshold": threshold,
                    "decision": None if decisions is None else int(decisions[index]),
                    "map": "",
                    "mask": str(mask_paths[index] or ""),
                    "pixel_threshold": self._pixel_threshold,
                }
            )
        if maps is not None and masks is not None:
            self._sample_pixels(maps, masks.detach().cpu().reshape(maps.shape[0], -1).long())

    def pixel_summary(self) -> dict[str, float | None] | None:
        """Pixel AUROC, AUPRO and Dice (at the pixel threshold) of the recorded maps; ``None`` without masks.

        Needs ``maps_dir`` (the maps are kept until :meth:`save_maps`); call it before that.
        """
        if not self._masks or len(self._masks) != len(self._maps):
            return None
        maps = torch.cat(self._maps).float()
        return pixel_summary(maps, torch.cat(self._masks), self._pixel_threshold)

    def save_maps(self) -> None:
        """Write the recorded maps to ``maps_dir`` and put their paths in the rows (after the timed test)."""
        if self.maps_dir is None or not self._maps:
            return
        paths = save_maps(torch.cat(self._maps), [str(row["file"]) for row in self.rows], self.maps_dir)
        for row, path in zip(self.rows, paths, strict=True):
            row["map"] = str(path)
        self._maps.clear()

    def _sample_pixels(self, maps: torch.Tensor, masks: torch.Tensor) -> None:
        values = maps.reshape(maps.shape[0], -1)
        if masks.shape[1] != values.shape[1]:
            return  # a mask of another size than the map: no pixel curve rather than a wrong one
        per_image = self._per_image or values.shape[1]
        if per_image >= values.shape[1]:
            self._pixel_scores.append(values.flatten())
            self._pixel_targets.append(masks.flatten())
            return
        for image_values, image_mask in zip(values, masks, strict=True):
            chosen = torch.randperm(values.shape[1], generator=self._generator)[:per_image]
            self._pixel_scores.append(image_values[chosen])
            self._pixel_targets.append(image_mask[chosen])


def _threshold(pl_module: Any, level: str) -> float | None:
    """The ``image`` or ``pixel`` threshold of the values anomalib's metrics see (its post-processor's), if any."""
    post_processor = getattr(pl_module, "post_processor", None)
    if post_processor is None or not getattr(post_processor, "enable_normalization", True):
        value = getattr(post_processor, f"{level}_threshold", None)
    else:
        value = getattr(post_processor, f"normalized_{level}_threshold", None)
    return finite_or_none(value)
