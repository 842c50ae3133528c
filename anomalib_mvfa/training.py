"""How ``Mvfa`` trains its adapters in Lightning's fit loop.

- :class:`FitInputs`: what every step of one fit needs, computed once when training starts (the
  training text features, and the frozen prefix of in-memory support images);
- :func:`optimisation_step`: one step of both Adam optimisers (manual optimisation) and the logged
  epoch means of the losses;
- :func:`epoch_summary`: the line of the epoch's mean losses, and a diverged fit stopped;
- :class:`QuietFrozenClip`: Lightning's warning about modules in eval mode, silenced for the frozen
  CLIP only and only while Lightning checks (no warnings filter outlives it).

Example:
    >>> inputs = FitInputs.compute(model, training_set, cache_prefix=True)  # doctest: +SKIP
    >>> optimisation_step(model, batch, inputs)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.optim import Optimizer

from .errors import MvfaTrainingDivergedError
from .support import SupportBatch, TrainingSet

if TYPE_CHECKING:
    from .lightning_model import Mvfa

__all__ = ["PREFIX_CHUNK", "FitInputs", "QuietFrozenClip", "adapter_optimizers", "epoch_summary", "optimisation_step"]

# Support images run through the frozen prefix at once when the fit starts.
PREFIX_CHUNK = 8


@dataclass
class FitInputs:
    """What every training step of one fit needs, computed once from its training set.

    Attributes:
        training_set: What the fit trains on.
        text_features: ``n x C x 2``, one per prompt class of the training set, or ``None`` (the model's own).
        prefix_cache: ``N x T x W``, row ``i``: the frozen prefix of support image ``i``, or ``None``.
    """

    training_set: TrainingSet
    text_features: torch.Tensor | None = None
    prefix_cache: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def compute(cls, model: Mvfa, training_set: TrainingSet, cache_prefix: bool) -> FitInputs:
        """Text features of the training set's prompt classes; with ``cache_prefix``, the prefix of in-memory images.

        The prefix (the blocks before the first adapter) is cached when the training set holds its
        images in memory (the few-shot support set).
        """
        names = training_set.class_names
        torch_model = model.model
        text_features = torch.stack([torch_model.encode_prompts(name) for name in names]) if names else None
        prefix_cache = None
        if cache_prefix and training_set.images is not None:
            images = model.preprocess(training_set.images.to(model.device))
            torch_model.check_images(images, "support images")
            prefix_cache = torch.cat([torch_model.encode_prefix(chunk) for chunk in images.split(PREFIX_CHUNK)])
        return cls(training_set, text_features, prefix_cache)

    def tokens(self, model: Mvfa, batch: SupportBatch) -> Any:
        """The batch's tokens: from the cached prefix (indexed on the device), else from the images."""
        if self.prefix_cache is not None:
            return model.model.encode_from(self.prefix_cache[batch.index], start=model.model.feature_layers[0])
        # anomalib's PreProcessor callback has transformed batch.image already
        model.model.check_images(batch.image, "support images", finite=False)
        return model.model.encode(batch.image)


def adapter_optimizers(torch_model: Any, seg_learning_rate: float, det_learning_rate: float) -> list[Optimizer]:
    """Adam optimisers of the segmentation and of the detection adapters, with the authors' betas (0.5, 0.999)."""
    return [
        torch.optim.Adam(torch_model.seg_adapters.parameters(), lr=seg_learning_rate, betas=(0.5, 0.999)),
        torch.optim.Adam(torch_model.det_adapters.parameters(), lr=det_learning_rate, betas=(0.5, 0.999)),
    ]


def optimisation_step(model: Mvfa, batch: SupportBatch, inputs: FitInputs) -> STEP_OUTPUT:
    """One MVFA step on a batch of augmented support images; no value is read back from the device."""
    seg_optimizer, det_optimizer = model.optimizers()
    text_features = None if inputs.text_features is None else inputs.text_features[batch.class_index]
    outputs = model.model.training_outputs(inputs.tokens(model, batch), text_features)
    masks = batch.gt_mask if inputs.training_set.segmentation else None
    seg_loss, det_loss = model.loss(outputs, batch.gt_label, masks, batch.has_mask)
    loss = det_loss if seg_loss is None else seg_loss + det_loss
    seg_optimizer.zero_grad()
    det_optimizer.zero_grad()
    model.manual_backward(loss)
    seg_optimizer.step()
    det_optimizer.step()
    size = batch.image.shape[0]
    # epoch means only: a per-step value in the progress bar would synchronise with the device every step.
    # Under DDP each process's loss is its share of the global one: the epoch means are averaged over the
    # processes (once an epoch), so that every process sees the same value (and stops alike on a NaN).
    model.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True)
    model.log("train_det_loss", det_loss, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
    if seg_loss is not None:
        # weighted by the batch's share of the images with masks (under DDP: of all processes' images),
        # so that the synced epoch mean is that of one process loading every process's batch
        model.train_seg_loss.update(seg_loss.detach(), weight=model.loss.last_weight_total)
        model.log("train_seg_loss", model.train_seg_loss, on_step=False, on_epoch=True)
    return {"loss": loss.detach()}


def epoch_summary(trainer: Trainer, epochs: int, learning_rates: tuple[float, float]) -> str | None:
    """The line that shows the epoch's mean losses (as Lightning logged them) falling; ``None`` on other processes.

    Epochs are counted from 1 (``Mvfa epoch 3/3`` for the last of three), a resumed fit's as well.

    Raises:
        MvfaTrainingDivergedError: If the epoch's mean loss is NaN or infinite. Lightning runs the
            model's epoch-end hook before its checkpoint callbacks, so nothing of the diverged run is saved.
    """
    logged = trainer.callback_metrics
    if "train_loss" not in logged:
        return None
    total = float(logged["train_loss"])
    if not math.isfinite(total):
        msg = (
            f"Mvfa training diverged: the mean loss of epoch {trainer.current_epoch + 1} is NaN or infinite (learning "
            f"rates {learning_rates[0]:g} and {learning_rates[1]:g}). The fit is stopped and no model "
            "or adapter file is written; lower the learning rates or check the images."
        )
        raise MvfaTrainingDivergedError(msg)
    if not trainer.is_global_zero:
        return None
    segmentation = f"{float(logged['train_seg_loss']):.4f}" if "train_seg_loss" in logged else "not trained"
    return (
        f"Mvfa epoch {trainer.current_epoch + 1}/{epochs}: loss {total:.4f} "
        f"(segmentation {segmentation}, detection {float(logged['train_det_loss']):.4f})"
    )


class QuietFrozenClip(Callback):
    """Silence Lightning's "modules in eval mode" warning when those modules are the frozen CLIP's only.

    CLIP stays in eval mode on purpose (``MvfaModel.train``); any other module in eval mode is
    still reported. Lightning checks between the fit's start and the training start, inside
    ``trainer.fit`` (which anomalib's Engine calls), so the warning cannot be wrapped from outside:
    a ``warnings.catch_warnings()`` scope opens when the fit starts and closes when training starts,
    when the fit ends or fails. The warnings filters are then as they were.

    Example:
        >>> QuietFrozenClip().state_dict()  # nothing in checkpoints
        {}
    """

    def __init__(self) -> None:
        self._scope: warnings.catch_warnings | None = None
        self._filters: list[Any] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the scope when only modules of ``model.clip`` are in eval mode."""
        del trainer
        self._close()
        in_eval = [name for name, module in pl_module.named_modules() if not module.training]
        if not in_eval or not all(name == "model.clip" or name.startswith("model.clip.") for name in in_eval):
            return
        self._scope = warnings.catch_warnings()
        self._scope.__enter__()
        self._filters = warnings.filters
        warnings.filterwarnings(
            "ignore",
            message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start of training",
            category=PossibleUserWarning,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning has checked: close the scope."""
        del trainer, pl_module
        self._close()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Close the scope of a fit that trained no step."""
        del trainer, pl_module
        self._close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Close the scope of a fit that failed before training started."""
        del trainer, pl_module, exception
        self._close()

    def _close(self) -> None:
        scope, filters = self._scope, self._filters
        self._scope = self._filters = None
        # a scope closed by someone else in between (an enclosing catch_warnings that exited) is left alone
        if scope is not None and warnings.filters is filters:
            scope.__exit__(None, None, None)
