"""Speed of MVFA against the way the authors run it: ``anomalib-mvfa speed``.

Training, per epoch over the augmented support set (batch size 1, two Adam optimisers):

- ``reference``: the authors' way. Every CLIP parameter keeps ``requires_grad=True`` (only the
  adapters are stepped), and the whole image encoder (all blocks, the final norm and projection)
  is recomputed for every support image in every epoch.
- ``optimised``: what ``Mvfa`` does. CLIP is frozen, the blocks before the first adapter run
  once per support image (cached for all epochs), and no block after the last adapter runs.
  The result is the same: the command prints the largest difference of the adapter weights.

Inference: MVFA's batched scoring against the plain CLIP image forward, and the share of the
few-shot nearest-neighbour search: exact (float32), with bfloat16 similarities and, given
``--memory-bank-ratio``, on a coreset; the approximate searches print their recall of the exact
nearest neighbour and how much farther the neighbours they return are.

On a GPU (``--device cuda``) every measurement synchronises only at its end, and ``--amp``
runs both training loops and the inference under autocast.

Example:
    anomalib-mvfa speed --backbone ViT-B-16 --image-size 224 --k-shot 4
    anomalib-mvfa speed --device cuda --amp bfloat16 --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from ..encoder import ADAPTER_WEIGHT, RESIDUAL_WEIGHT, AdaptedTokens
from ..loss import MvfaLoss
from ..memory_bank import SEARCH_PRECISIONS
from ..support.augmentation import augment_support_set
from ..torch_model import MvfaModel
from .options import backbone_settings
from .options import speed as add_arguments  # noqa: F401  (the command's arguments, kept importable here)

BETAS = (0.5, 0.999)


def reference_encode(model: MvfaModel, images: torch.Tensor) -> AdaptedTokens:
    """The full adapted encoder as the authors run it: every block, then the final norm and projection."""
    tokens = model.embed(images)
    segmentation, detection = [], []
    for number in range(1, model.depth + 1):
        tokens = model.run_blocks(tokens, number - 1, number)
        if number in model.feature_layers:
            index = model.feature_layers.index(number)
            seg_mid, seg_out = model.seg_adapters[index](tokens)
            det_mid, det_out = model.det_adapters[index](tokens)
            tokens = RESIDUAL_WEIGHT * tokens + ADAPTER_WEIGHT * seg_out + ADAPTER_WEIGHT * det_out
            segmentation.append(seg_mid[:, 1:])
            detection.append(det_mid[:, 1:])
    model.tower.pool(tokens)  # computed (as in the authors' forward), not used by the losses
    return AdaptedTokens(segmentation, detection)


def _optimisers(model: MvfaModel, learning_rate: float) -> list[torch.optim.Optimizer]:
    return [
        torch.optim.Adam(model.seg_adapters.parameters(), lr=learning_rate, betas=BETAS),
        torch.optim.Adam(model.det_adapters.parameters(), lr=learning_rate, betas=BETAS),
    ]


def _step(
    model: MvfaModel,
    optimisers: Sequence[torch.optim.Optimizer],
    criterion: MvfaLoss,
    tokens: AdaptedTokens,
    label: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    seg_loss, det_loss = criterion(model.training_outputs(tokens), label, mask)
    for optimiser in optimisers:
        optimiser.zero_grad()
    (seg_loss + det_loss).backward()
    for optimiser in optimisers:
        optimiser.step()


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _autocast(device: torch.device, amp: str | None) -> Iterator[None]:
    """Autocast to ``amp`` (``"bfloat16"`` or ``"float16"``) on ``device``; nothing when ``amp`` is None."""
    with torch.autocast(device.type, dtype=getattr(torch, amp or "bfloat16"), enabled=amp is not None):
        yield


def _train_epochs(
    model: MvfaModel,
    encode_one: Callable[[int], AdaptedTokens],
    labels: torch.Tensor,
    masks: torch.Tensor,
    orders: Sequence[Sequence[int]],
    learning_rate: float,
) -> list[float]:
    """Batch-size-1 MVFA training over ``orders`` (one epoch each); returns seconds per epoch."""
    model.train()
    optimisers, criterion = _optimisers(model, learning_rate), MvfaLoss()
    device = labels.device
    seconds = []
    for order in orders:
        _synchronise(device)
        started = time.perf_counter()
        for index in order:
            tokens = encode_one(index)
            _step(model, optimisers, criterion, tokens, labels[index : index + 1], masks[index : index + 1])
        _synchronise(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def train_reference(
    model: MvfaModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    orders: Sequence[Sequence[int]],
    learning_rate: float = 1e-3,
) -> list[float]:
    """The authors' training loop, one epoch per entry of ``orders``; returns seconds per epoch."""
    model.clip.requires_grad_(True)  # as the authors leave it; only the adapters are stepped
    try:
        return _train_epochs(
            model,
            lambda index: reference_encode(model, images[index : index + 1]),
            labels,
            masks,
            orders,
            learning_rate,
        )
    finally:
        model.clip.requires_grad_(False)


def train_optimised(
    model: MvfaModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    orders: Sequence[Sequence[int]],
    learning_rate: float = 1e-3,
) -> list[float]:
    """``Mvfa``'s training loop (frozen CLIP, cached prefix); returns seconds per epoch (cache fill in epoch 1)."""
    cache: dict[int, torch.Tensor] = {}

    def encode_one(index: int) -> AdaptedTokens:
        if index not in cache:
            cache[index] = model.encode_prefix(images[index : index + 1])
        return model.encode_from(cache[index], start=model.feature_layers[0])

    return _train_epochs(model, encode_one, labels, masks, orders, learning_rate)


def max_adapter_difference(first: MvfaModel, second: MvfaModel) -> float:
    """Largest absolute difference between the adapter weights of two models."""
    pairs = zip(first.adapter_state_dict().values(), second.adapter_state_dict().values(), strict=True)
    return max((a[key] - b[key]).abs().max().item() for a, b in pairs for key in a)


def _median_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        _synchronise(device)
        started = time.perf_counter()
        function()
        _synchronise(device)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _search(
    queries: Sequence[torch.Tensor], banks: Sequence[torch.Tensor], precision: str, repeats: int
) -> tuple[float, torch.Tensor]:
    """Median seconds of the nearest-neighbour search of every layer and branch, and its distances."""

    def search() -> torch.Tensor:
        return torch.cat(
            [
                MvfaModel.nearest_neighbour_distance(q, b, precision).flatten()
                for q, b in zip(queries, banks, strict=True)
            ]
        )

    return _median_seconds(search, repeats, queries[0].device), search()


def _approximation(found: torch.Tensor, exact: torch.Tensor) -> str:
    """Recall of the exact nearest neighbour and how much farther the returned neighbours are."""
    recall = 100 * ((found - exact).abs() <= 1e-6).float().mean()
    increase = found - exact
    return (
        f"recall of the exact nearest neighbour {recall:.1f}%, distance increase mean {increase.mean():.2e}, "
        f"max {increase.max():.2e}"
    )


def _measure_training(
    model: MvfaModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    orders: Sequence[Sequence[int]],
    amp: str | None,
) -> None:
    """Train a copy of ``model`` the reference way and ``model`` the optimised way; print both."""
    reference_model = copy.deepcopy(model)
    with _autocast(images.device, amp):
        reference = train_reference(reference_model, images, labels, masks, orders)
        optimised = train_optimised(model, images, labels, masks, orders)
    difference = max_adapter_difference(reference_model, model)
    print("training, seconds per epoch (optimised epoch 1 includes filling the prefix cache):")
    for epoch, (slow, fast) in enumerate(zip(reference, optimised, strict=True), start=1):
        print(f"  epoch {epoch}: reference {slow:.2f} s, optimised {fast:.2f} s, speed-up {slow / fast:.2f}x")
    print(f"  largest adapter weight difference after training: {difference:.2e}")


def run(args: argparse.Namespace) -> int:
    """Measure and print the ratios (``--deploy``: the deployment paths, :mod:`.deploy`); return an exit code."""
    if args.deploy:
        from .deploy import run as run_deploy  # noqa: PLC0415

        return run_deploy(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    pretrained, size, layers = backbone_settings(args, pretrained="none", image_size=224)
    model = MvfaModel(args.backbone, pretrained, size, layers, feature_pipeline=args.feature_pipeline)
    model = model.to(device)
    model.setup("object")
    generator = torch.Generator().manual_seed(args.seed)
    count = 2 * args.k_shot
    masks = torch.zeros(count, size, size)
    masks[args.k_shot :, size // 4 : size // 2, size // 4 : size // 2] = 1
    support = augment_support_set(torch.randn(count, 3, size, size, generator=generator), masks)
    labels = (support.groups >= args.k_shot).float().to(device)
    support_images, support_masks = support.images.to(device), support.masks.to(device)
    orders = [torch.randperm(len(labels), generator=generator).tolist() for _ in range(args.epochs)]
    print(
        f"{args.backbone} at {size}, feature layers {model.feature_layers}, feature pipeline {model.feature_pipeline}, "
        f"{torch.get_num_threads()} threads, "
        f"{len(labels)} support images, {args.epochs} epoch(s), device {device}, autocast {args.amp or 'off'}"
    )

    if args.epochs > 0:
        _measure_training(model, support_images, labels, support_masks, orders, args.amp)

    model.eval()
    images = torch.randn(args.batch_size, 3, size, size, generator=generator).to(device)
    normal = support.groups < args.k_shot
    with torch.no_grad(), _autocast(device, args.amp):
        model.setup(reference_images=support_images[normal.to(device)], reference_groups=support.groups[normal])
        clip_seconds = _median_seconds(lambda: model.clip.encode_image(images), args.repeats, device)
        scoring = []
        for precision in SEARCH_PRECISIONS:
            model.search_precision = precision
            scoring.append((precision, _median_seconds(lambda: model(images), args.repeats, device)))
        print(f"inference, batch {args.batch_size}: plain CLIP image forward {clip_seconds:.3f} s")
        for precision, seconds in scoring:
            overhead = 100 * (seconds / clip_seconds - 1)
            print(f"  MVFA scoring at K={args.k_shot}, {precision} search: {seconds:.3f} s, overhead {overhead:.0f}%")

        bank = augment_support_set(torch.randn(args.search_k_shot, 3, size, size, generator=generator))
        bank_tokens = model.encode_batched(bank.images.to(device))
        tokens = model.encode(images)
        queries = [*tokens.segmentation, *tokens.detection]
        exact_banks = [*model.memory_bank(bank_tokens.segmentation), *model.memory_bank(bank_tokens.detection)]
        print(
            f"nearest-neighbour search at K={args.search_k_shot} ({exact_banks[0].shape[0]} tokens a layer), "
            f"share of the plain CLIP image forward:"
        )
        exact_seconds, exact = _search(queries, exact_banks, "float32", args.repeats)
        print(f"  exact, float32: {exact_seconds:.3f} s, {100 * exact_seconds / clip_seconds:.0f}%")
        seconds, found = _search(queries, exact_banks, "bfloat16", args.repeats)
        print(
            f"  bfloat16 similarities: {seconds:.3f} s, {100 * seconds / clip_seconds:.0f}%; "
            f"{_approximation(found, exact)}"
        )
        if args.memory_bank_ratio is not None:
            ratio = args.memory_bank_ratio
            started = time.perf_counter()
            coreset_banks = [
                *model.memory_bank(bank_tokens.segmentation, ratio),
                *model.memory_bank(bank_tokens.detection, ratio),
            ]
            build_seconds = time.perf_counter() - started
            for precision in SEARCH_PRECISIONS:
                seconds, found = _search(queries, coreset_banks, precision, args.repeats)
                print(
                    f"  coreset {ratio:g} ({coreset_banks[0].shape[0]} tokens a layer, built once in "
                    f"{build_seconds:.1f} s), {precision}: {seconds:.3f} s, {100 * seconds / clip_seconds:.0f}%; "
                    f"{_approximation(found, exact)}"
                )
    return 0
