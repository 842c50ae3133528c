"""Pixel AUROC, AUPRO and Dice of a split: in a process group, each process's own figures."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomalib_mvfa.reports.results import pixel_summary


def _maps(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of four 16 x 16 maps with a square lesion each, scored differently by each rank."""
    generator = torch.Generator().manual_seed(rank)
    masks = torch.zeros(4, 16, 16, dtype=torch.bool)
    masks[:, 4:10, 4:10] = True
    noise = torch.rand(4, 16, 16, generator=generator)
    return noise + (0.2 + 0.6 * rank) * masks, masks


def _summarise_in_group(rank: int, folder: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder / 'group'}", rank=rank, world_size=2)
    try:
        anomaly_map, masks = _maps(rank)
        (folder / f"rank{rank}.json").write_text(json.dumps(pixel_summary(anomaly_map, masks, threshold=0.5)))
    finally:
        dist.destroy_process_group()


def test_each_process_of_a_group_gets_the_figures_of_its_own_maps(tmp_path) -> None:
    alone = [pixel_summary(*_maps(rank), threshold=0.5) for rank in (0, 1)]
    joined = pixel_summary(*(torch.cat(parts) for parts in zip(_maps(0), _maps(1), strict=True)), threshold=0.5)
    assert abs(joined["AUPRO"] - alone[0]["AUPRO"]) > 1e-3  # a synchronised metric would show
    mp.spawn(_summarise_in_group, args=(tmp_path,), nprocs=2, join=True)
    for rank in (0, 1):
        in_group = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text())}
        assert in_group[rank]["AUPRO"] == alone[rank]["AUPRO"]
        assert in_group[rank]["pixel_AUROC"] == alone[rank]["pixel_AUROC"]
