"""MVFA's few-shot branch: its memory banks, how they are built and searched.

A memory bank holds, per feature layer, the normalised adapted tokens of the normal support images
(all of them, or a k-center-greedy coreset of them). A query token's few-shot anomaly value is its
cosine distance to the nearest token of the bank, searched exactly in float32 or with bfloat16
similarities (see :func:`nearest_neighbour_distance`); :func:`score_against_memory_banks` sums these distances
over the feature layers into an anomaly map and an image score. The banks themselves are buffers of
:class:`~anomalib_mvfa.torch_model.MvfaModel` (checkpoint keys ``model.seg_memory_bank`` and
``model.det_memory_bank``); this module holds the functions.

Example:
    >>> import torch
    >>> from anomalib_mvfa.memory_bank import build_memory_bank, nearest_neighbour_distance
    >>> bank = build_memory_bank([torch.randn(2, 16, 8)])  # one layer, 2 images of 16 tokens
    >>> bank.shape
    torch.Size([1, 32, 8])
    >>> nearest_neighbour_distance(torch.randn(3, 16, 8), bank[0]).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from anomalib.models.components import KCenterGreedy
from torch.nn import functional as F  # noqa: N812

from .encoder import AdaptedTokens
from .errors import MvfaInputError

__all__ = [
    "NEAREST_NEIGHBOUR_CHUNK",
    "SEARCH_PRECISIONS",
    "build_memory_bank",
    "build_memory_banks",
    "check_memory_bank_settings",
    "coreset_indices",
    "nearest_neighbour_distance",
    "score_against_memory_banks",
]

# Memory-bank tokens compared with the queries at once (bounds the memory of the distance matrix).
NEAREST_NEIGHBOUR_CHUNK = 8192
# Precisions of the few-shot nearest-neighbour search (see nearest_neighbour_distance).
SEARCH_PRECISIONS = ("float32", "bfloat16")


def check_memory_bank_settings(
    memory_bank_ratio: float, search_precision: str, inference_precision: str = "float32"
) -> None:
    """Refuse a coreset ratio outside ``(0, 1]`` or an unknown search or inference precision.

    Example:
        >>> check_memory_bank_settings(0.1, "bfloat16")
        >>> check_memory_bank_settings(0.0, "float32")
        Traceback (most recent call last):
        ...
        anomalib_mvfa.errors.MvfaInputError: memory_bank_ratio must be in (0, 1], got 0.0.
    """
    if not 0.0 < memory_bank_ratio <= 1.0:
        msg = f"memory_bank_ratio must be in (0, 1], got {memory_bank_ratio}."
        raise MvfaInputError(msg)
    if search_precision not in SEARCH_PRECISIONS:
        msg = f"search_precision must be one of {SEARCH_PRECISIONS}, got {search_precision!r}."
        raise MvfaInputError(msg)
    if inference_precision not in SEARCH_PRECISIONS:
        msg = f"inference_precision must be one of {SEARCH_PRECISIONS}, got {inference_precision!r}."
        raise MvfaInputError(msg)


def coreset_indices(bank: torch.Tensor, ratio: float, seed: int = 0) -> list[int]:
    """k-center-greedy coreset of ``bank`` with anomalib's sampler, seeded (its projection and first centre).

    Example:
        >>> len(coreset_indices(torch.randn(100, 8), ratio=0.1))
        10
    """
    sampler = KCenterGreedy(embedding=bank, sampling_ratio=ratio)
    sampler.model.random_state = seed  # the sparse random projection draws from numpy otherwise
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the random first centre
        return sampler.select_coreset_idxs()


def build_memory_bank(layer_tokens: list[torch.Tensor], ratio: float = 1.0) -> torch.Tensor:
    """Normalised tokens of all images per layer, ``n_layers x M x C`` (``M = N * T`` when exact).

    ``layer_tokens`` holds one ``N x T x C`` tensor per layer (see
    :meth:`anomalib_mvfa.encoder.AdaptedTokens.bank_tokens`). With ``ratio < 1`` each layer keeps a
    k-center-greedy coreset of its tokens (seeded).

    Example:
        >>> build_memory_bank([torch.randn(2, 16, 8), torch.randn(2, 16, 8)], ratio=0.5).shape
        torch.Size([2, 16, 8])
    """
    banks = [F.normalize(tokens, dim=-1).flatten(0, 1) for tokens in layer_tokens]
    if ratio < 1.0:
        banks = [bank[coreset_indices(bank, ratio)] for bank in banks]
    return torch.stack(banks)


def build_memory_banks(
    tokens: AdaptedTokens, with_class_tokens: bool, ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmentation and the detection memory bank of ``tokens`` (see :func:`build_memory_bank`).

    ``with_class_tokens`` puts each image's CLS tokens in the banks (the ``"authors"`` feature pipeline).

    Example:
        >>> tokens = AdaptedTokens([torch.randn(2, 16, 8)], [torch.randn(2, 16, 8)])
        >>> [bank.shape for bank in build_memory_banks(tokens, with_class_tokens=False)]
        [torch.Size([1, 32, 8]), torch.Size([1, 32, 8])]
    """
    seg_memory_bank = build_memory_bank(tokens.bank_tokens("segmentation", with_class_tokens), ratio)
    det_memory_bank = build_memory_bank(tokens.bank_tokens("detection", with_class_tokens), ratio)
    return seg_memory_bank, det_memory_bank


def nearest_neighbour_distance(
    queries: torch.Tensor, memory_bank: torch.Tensor, precision: str = "float32"
) -> torch.Tensor:
    """``min_m (1 - cos(q, m))`` for ``B x L x C`` queries and a normalised ``N x C`` memory bank.

    The memory bank is processed in fixed chunks, so the peak memory does not grow with its
    size and the number of chunks does not depend on the batch (export-friendly).

    Args:
        queries: ``B x L x C`` tokens.
        memory_bank: ``N x C`` normalised tokens.
        precision: ``"float32"`` searches exactly. ``"bfloat16"`` picks the neighbour with
            bfloat16 similarities (about twice as fast on CPUs with bfloat16 instructions)
            and returns that neighbour's exact distance: a query whose nearest neighbour
            is missed gets the distance of one that is at most a few thousandths farther.

    Example:
        >>> bank = F.normalize(torch.randn(50, 8), dim=-1)
        >>> nearest_neighbour_distance(bank[None, :3], bank).abs().max() < 1e-6
        tensor(True)
    """
    flat = F.normalize(queries, dim=-1).flatten(0, 1)
    memory = memory_bank.to(flat.dtype)
    if precision == "float32":
        similarity = torch.stack(
            [(flat @ chunk.T).amax(dim=1) for chunk in memory.split(NEAREST_NEIGHBOUR_CHUNK)]
        ).amax(dim=0)
    elif precision == "bfloat16":
        low = flat.to(torch.bfloat16)
        best = [(low @ chunk.T).max(dim=1) for chunk in memory.to(torch.bfloat16).split(NEAREST_NEIGHBOUR_CHUNK)]
        values = torch.stack([found.values for found in best])
        offsets = torch.arange(0, memory.shape[0], NEAREST_NEIGHBOUR_CHUNK, device=flat.device)
        indices = torch.stack([found.indices for found in best]) + offsets[:, None]
        nearest = indices.gather(0, values.argmax(dim=0, keepdim=True))[0]
        similarity = (flat * memory[nearest]).sum(dim=-1)
    else:
        msg = f"precision must be 'float32' or 'bfloat16', got {precision!r}."
        raise MvfaInputError(msg)
    return (1.0 - similarity).reshape(queries.shape[:2])


def score_against_memory_banks(
    tokens: AdaptedTokens,
    seg_memory_bank: torch.Tensor,
    det_memory_bank: torch.Tensor,
    to_map: Callable[[torch.Tensor], torch.Tensor],
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-shot anomaly map (``B x H x W``) and score (``B``) of ``tokens`` against the memory banks.

    Per feature layer, each patch's nearest-neighbour distance is turned into a map by ``to_map``
    (``B x L x 1`` patch values to ``B x 1 x H x W``). The anomaly map sums the segmentation tokens'
    maps; the score sums the means of the detection tokens' maps. ``to_map`` must be linear (MVFA's
    bilinear upsampling is): the summed distances of the layers are mapped once.

    Example:
        >>> tokens = AdaptedTokens([torch.randn(2, 4, 8)], [torch.randn(2, 4, 8)])
        >>> banks = build_memory_banks(tokens, with_class_tokens=False)
        >>> grid = lambda values: values.transpose(1, 2).reshape(2, 1, 2, 2)
        >>> anomaly_map, score = score_against_memory_banks(tokens, *banks, to_map=grid)
        >>> anomaly_map.shape, score.shape
        (torch.Size([2, 2, 2]), torch.Size([2]))
    """

    def summed_distance_map(layers: list[torch.Tensor], banks: torch.Tensor) -> torch.Tensor:
        # the maps of the layers summed = the map of the summed distances: ``to_map`` upsamples linearly
        distances = [
            nearest_neighbour_distance(layer, bank, precision) for layer, bank in zip(layers, banks, strict=True)
        ]
        return to_map(torch.stack(distances).sum(dim=0)[..., None])[:, 0]

    anomaly_map = summed_distance_map(tokens.segmentation, seg_memory_bank)
    score = summed_distance_map(tokens.detection, det_memory_bank).mean(dim=(-2, -1))
    return anomaly_map, score
