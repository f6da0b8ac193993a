"""Each torchrun rank runs this: every sparsifier on a small CNN, in four phases over the same batches.

    torchrun --nproc_per_node=2 -m tests.compress.ddp_sparsifier OUT_DIR

* ``ddp``: DistributedDataParallel, each global batch split across ranks (gradients all-reduced).
* ``local``: no DDP; each rank trains its own replica (initialised with its own seed) on its own half of
  every batch (gradients NOT all-reduced, so the replicas differ throughout); decisions still agree
  because the sparsifier averages its scores across ranks and broadcasts rank 0's clusters.
* ``control``: as ``local`` with that averaging switched off (``device.world_size`` patched to 1 in this
  driver): decisions taken on each rank's own weights, which must disagree for some method.
* ``resumed``: as ``ddp`` for CUT steps; rank 0 alone saves model, optimizer and sparsifier state with
  ``torch.save``; after a barrier fresh objects on every rank load it (``weights_only=True``) and finish.

Every rank writes ``ranks-rank{R}.json``: per phase, per method, [step, decisions] whenever they change,
a fingerprint of the final weights, and for ``resumed`` whether the final weights and the decisions equal
the uninterrupted ``ddp`` run's. Rank 0 alone slims each ``ddp`` model and writes ``slim-rank0.json``.
``run(name, rank=0, world=1)`` is the one-process run over the same global batches.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from slimship.compress import device, sparsifier
from slimship.slimming import slim

STEPS, GLOBAL_BATCH = 20, 32
CUT = 7  # the resumed run's checkpoint: inside every method's pruning stage
METHODS: dict[str, dict[str, Any]] = {
    "hesso": {"warmup_steps": 4, "pruning_steps": 9, "periods": 3},
    "hspg": {"warmup_steps": 4, "projection_steps": 9},
    "drop": {"pruning_steps": 12, "rounds": 4, "drop_in": 0.5, "criterion": "salience"},
    "csgd": {"centripetal": 0.5},
    "magnitude": {"prune_steps": 3, "pruning_steps": 9},
    "simguided": {"prune_steps": 3, "pruning_steps": 9},
}


def small_cnn(seed: int = 0) -> nn.Module:
    """No batch norm, so a rank's forward on its samples matches one process on the whole batch."""
    torch.manual_seed(seed)
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


def build(name: str, world: int, ddp: bool, state: dict[str, Any] | None = None, seed: int = 0):
    """(model, what the loop calls, sparsifier, optimizer); `state` from a checkpoint is loaded into each."""
    model = small_cnn(seed=seed if state is None else 1)  # a fresh process: other weights until loaded
    if state is not None:
        model.load_state_dict(state["model"])
    wrapped = nn.parallel.DistributedDataParallel(model) if ddp and world > 1 else model
    sp = sparsifier(name, wrapped, example(), total_steps=STEPS, **METHODS[name])
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
    if state is not None:
        sp.load_state_dict(state["sp"])
        optimizer.load_state_dict(state["opt"])
    return model, wrapped, sp, optimizer


def train(wrapped: nn.Module, sp, optimizer, rank: int, world: int, steps: range, changes: list) -> None:
    """The user's loop over this rank's share of global batches `steps`; decisions appended as they change."""
    batches = global_batches()
    for step in steps:
        x, y = batches[step]
        optimizer.zero_grad()
        F.cross_entropy(wrapped(x[rank::world]), y[rank::world]).backward()
        sp.after_backward()
        optimizer.step()
        sp.after_step()
        decisions = sp.decisions()
        if not changes or changes[-1][1] != decisions:
            changes.append([step, decisions])


def run(name: str, rank: int, world: int, ddp: bool = True) -> tuple[list[list[Any]], nn.Module]:
    """Train with sparsifier `name` on this rank's share of every global batch; decisions as they change.
    Without `ddp` each rank's replica starts from its own weights (seeded by rank) and trains alone."""
    model, wrapped, sp, optimizer = build(name, world, ddp, seed=0 if ddp else rank)
    changes: list[list[Any]] = []
    train(wrapped, sp, optimizer, rank, world, range(STEPS), changes)
    return changes, model.eval()


def resumed(name: str, rank: int, world: int, out: Path) -> tuple[list[list[Any]], nn.Module]:
    """`run` with a checkpoint after CUT steps, saved by rank 0, loaded into fresh objects on every rank."""
    model, wrapped, sp, optimizer = build(name, world, ddp=True)
    changes: list[list[Any]] = []
    train(wrapped, sp, optimizer, rank, world, range(CUT), changes)
    path = out / f"checkpoint-{name}.pt"
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "sp": sp.state_dict()}, path)
    dist.barrier()
    model, wrapped, sp, optimizer = build(name, world, ddp=True, state=torch.load(path, weights_only=True))
    train(wrapped, sp, optimizer, rank, world, range(CUT, STEPS), changes)
    return changes, model.eval()


def fingerprint(model: nn.Module) -> str:
    """sha256 of the model's weights (equal on two ranks only if their replicas are equal)."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


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
    report: dict[str, dict[str, Any]] = {k: {} for k in ("ddp", "local", "control", "resumed", "fingerprint")}
    slimmed = {}
    for name in METHODS:
        report["ddp"][name], model = run(name, rank, world)
        if rank == 0:
            slimmed[name] = slims_exactly(model)
        report["local"][name], local = run(name, rank, world, ddp=False)
        with mock.patch.object(device, "world_size", lambda: 1):  # no averaging, no broadcast
            report["control"][name], _ = run(name, rank, world, ddp=False)
        changes, again = resumed(name, rank, world, out)
        report["resumed"][name] = {
            "weights": same_weights(again, model),
            "decisions": changes == report["ddp"][name],
        }
        report["fingerprint"][name] = {"ddp": fingerprint(model), "local": fingerprint(local)}
    (out / f"ranks-rank{rank}.json").write_text(json.dumps(report, sort_keys=True))
    if rank == 0:
        (out / "slim-rank0.json").write_text(json.dumps(slimmed, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
