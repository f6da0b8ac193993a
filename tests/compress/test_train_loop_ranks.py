"""train_loop under a real 2-process gloo group: every rank ends with rank 0's model, buffers included
(BatchNorm running statistics follow each rank's own last batches under DDP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _train_rank(rank: int, folder: str) -> None:
    """One rank: a BatchNorm model trained on this rank's own batches; its state saved to rank<r>.pt."""
    from slimship.compress.training import LoopOptions, train_loop

    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(folder) / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)]
        model = nn.Sequential(*layers)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        batches = [(torch.randn(4, 1, 8, 8, generator=g) + rank, torch.randint(0, 3, (4,), generator=g))] * 2
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_loop(model, batches, LoopOptions(epochs=1), optimizer=optimizer, desc="ranks")
        torch.save(model.state_dict(), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~20 s on a loaded machine
def test_every_rank_ends_training_with_rank_0s_parameters_and_buffers(tmp_path) -> None:
    mp.spawn(_train_rank, args=(str(tmp_path),), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert float(states[0]["1.running_mean"].abs().sum()) > 0  # statistics were gathered
    for name, value in states[0].items():
        assert torch.equal(states[1][name], value), name
