"""Each torchrun rank runs this: every sparsifier on a small CNN, each global batch split across ranks.

    torchrun --nproc_per_node=2 -m tests.compress.ddp_sparsifier OUT_DIR

Every rank writes ``decisions-rank{R}.json`` (per method: [step, decisions] whenever the decisions
change); rank 0 alone slims each final model and writes ``slim-rank0.json`` (method -> outputs equal).
``run(name, rank=0, world=1)`` is the one-process run over the same global batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimship.compress import sparsifier
from slimship.slimming import slim

STEPS, GLOBAL_BATCH = 20, 32
METHODS: dict[str, dict[str, Any]] = {
    "hesso": {"warmup_steps": 4, "pruning_steps": 9, "periods": 3},
    "hspg": {"warmup_steps": 4, "projection_steps": 9},
    "drop": {"pruning_steps": 12, "rounds": 4, "drop_in": 0.5, "criterion": "salience"},
    "csgd": {"centripetal": 0.5},
    "magnitude": {"prune_steps": 3, "pruning_steps": 9},
    "simguided": {"prune_steps": 3, "pruning_steps": 9},
}


def small_cnn() -> nn.Module:
    """No batch norm, so a rank's forward on its samples matches one process on the whole batch."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 4),
    )


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (STEPS, GLOBAL_BATCH))
    x = rng.normal(0, 0.5, (STEPS, GLOBAL_BATCH, 1, 8, 8)) + (y - 1.5)[:, :, None, None, None]
    return [(torch.tensor(x[s], dtype=torch.float32), torch.tensor(y[s])) for s in range(STEPS)]


def example() -> tuple[torch.Tensor]:
    return (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)


def run(name: str, rank: int, world: int) -> tuple[list[list[Any]], nn.Module]:
    """Train with sparsifier `name` on this rank's share of every global batch; decisions as they change."""
    model = small_cnn()
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    sp = sparsifier(name, wrapped, example(), total_steps=STEPS, **METHODS[name])
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    changes: list[list[Any]] = []
    for step, (x, y) in enumerate(global_batches()):
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x[rank::world]), y[rank::world]).backward()
        sp.after_backward()
        optimizer.step()
        sp.after_step()
        decisions = sp.decisions()
        if not changes or changes[-1][1] != decisions:
            changes.append([step, decisions])
    return changes, model.eval()


def slims_exactly(model: nn.Module) -> bool:
    result = slim(model, example())
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = model(x), result.model(x)
    smaller = result.params_after < result.params_before
    return smaller and float((ref - got).abs().max()) <= 1e-5 * max(float(ref.abs().max()), 1e-8)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    decisions, slimmed = {}, {}
    for name in METHODS:
        decisions[name], model = run(name, rank, world)
        if rank == 0:
            slimmed[name] = slims_exactly(model)
    (out / f"decisions-rank{rank}.json").write_text(json.dumps(decisions, sort_keys=True))
    if rank == 0:
        (out / "slim-rank0.json").write_text(json.dumps(slimmed, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
