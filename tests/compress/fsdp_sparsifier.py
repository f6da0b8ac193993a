"""Each torchrun rank runs this: every user-loop sparsifier on the small CNN of ddp_sparsifier under FSDP2.

    torchrun --nproc_per_node=2 -m tests.compress.fsdp_sparsifier OUT_DIR

Per method, over the same global batches as ddp_sparsifier (each rank its half of every batch):

* ``fsdp``: the sparsifier built on the plain model, then ``fully_shard`` on every layer and the root (the
  parameters become DTensor shards, dim 0 split over the ranks); the user's loop; decisions as they change,
  and per step whether every decided zero group is exactly zero in the shards after the optimizer step.
* ``ddp``: ddp_sparsifier's DistributedDataParallel run, for the side-by-side comparison.
* the gathered full state dict (``get_model_state_dict(full_state_dict=True)``) loaded into a plain model on
  rank 0: which groups are zero there, whether ``slim`` removes them exactly, and the largest difference
  from the DDP run's weights.
* ``after``: a sparsifier built on an already sharded model: the error it raises.
* ``resume``: each rank saves its own sparsifier state mid-run and loads it into a fresh sparsifier built
  before sharding, finishing with the same decisions; another rank's state is refused.
* ``uneven``: the same on a CNN of 7 and 11 channels (shards of 4 + 3 and 6 + 5 rows: groups split unevenly
  and across ranks), against one process run inside this driver with the cross-rank averaging off.
* ``loop``: ``compress(name, ...)`` (slimship's own loop) under ``training_strategy("fsdp")`` and under
  ``"ddp"``: the zero groups, the largest weight difference, the parameter types of the result; a method
  whose hooks assume a plain model is refused under fsdp.

Every rank writes ``fsdp-rank{R}.json``. ``benchmarks/bench_fsdp_decisions.py`` launches this too.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from slimship.compress import compress, device, sparsifier
from slimship.compress.device import training_strategy
from slimship.compress.groups import zero_mask
from slimship.errors import CompressionError
from tests.compress.ddp_sparsifier import (
    METHODS,
    STEPS,
    example,
    global_batches,
    run,
    slims_exactly,
    small_cnn,
)

CUT = 7


def shard(model: nn.Module) -> nn.Module:
    """FSDP2: every layer with parameters its own unit, then the root."""
    for layer in model:
        if any(True for _ in layer.parameters(recurse=False)):
            fully_shard(layer)
    fully_shard(model)
    return model


def odd_cnn(seed: int = 0) -> nn.Module:
    """As small_cnn with 7 and 11 channels: 2 ranks hold 4 + 3 and 6 + 5 rows."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 7, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(7, 11, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(11, 4),
    )


def build(name: str, state: dict[str, Any] | None = None, net=small_cnn, sharded: bool = True):
    """(model, sparsifier, optimizer): the sparsifier on the plain model, then the model sharded."""
    model = net()
    sp = sparsifier(name, model, example(), total_steps=STEPS, **METHODS[name])
    if sharded:
        shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["opt"])
        sp.load_state_dict(state["sp"])
    return model, sp, optimizer


def train(model, sp, optimizer, rank: int, world: int, steps: range, changes: list, held: list) -> None:
    batches = global_batches()
    for step in steps:
        x, y = batches[step]
        optimizer.zero_grad()
        F.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        sp.after_backward()
        optimizer.step()
        sp.after_step()
        held.append(bool(sp.views.is_zero()[sp.zero].all()))  # summed over the shards
        decisions = sp.decisions()
        if not changes or changes[-1][1] != decisions:
            changes.append([step, decisions])


def full_model(model: nn.Module) -> nn.Module | None:
    """The gathered full state dict in a plain model on rank 0 (every rank takes part in the gathering)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = small_cnn(seed=1)
    plain.load_state_dict(full)
    return plain.eval()


def fsdp_run(name: str, rank: int, world: int) -> tuple[dict[str, Any], nn.Module]:
    model, sp, optimizer = build(name)
    changes: list = []
    held: list = []
    start = time.perf_counter()
    train(model, sp, optimizer, rank, world, range(STEPS), changes, held)
    seconds = time.perf_counter() - start
    sharded = [type(p).__name__ for p in model.parameters()]
    plain = full_model(model)
    zeros = [i for i, z in enumerate(zero_mask(plain, sp.groups)) if z] if plain is not None else None
    record = {"changes": changes, "held": held, "params": sharded, "zeros": zeros, "seconds": seconds}
    record["decided_zero"] = sp.zero.nonzero().flatten().tolist()
    return record, plain


def uneven(name: str, rank: int, world: int) -> dict[str, Any]:
    """Decisions on odd_cnn sharded over the ranks, and in one process over the same global batches."""
    model, sp, optimizer = build(name, net=odd_cnn)
    changes: list = []
    held: list = []
    train(model, sp, optimizer, rank, world, range(STEPS), changes, held)
    assert {type(p).__name__ for p in model.parameters()} == {"DTensor"}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    with mock.patch.object(device, "world_size", lambda: 1):  # one process: no averaging, no broadcast
        model, sp, optimizer = build(name, net=odd_cnn, sharded=False)
        single: list = []
        train(model, sp, optimizer, 0, 1, range(STEPS), single, [])
    diff = max(float((full[k] - v).abs().max()) for k, v in model.state_dict().items()) if full else None
    return {"changes": changes, "held": held, "single": single, "max_diff": diff}


def after(name: str) -> str:
    model = shard(small_cnn())
    try:
        sparsifier(name, model, example(), total_steps=STEPS, **METHODS[name])
    except CompressionError as exc:
        return str(exc)
    return "no error"


def resumed(name: str, rank: int, world: int, out: Path) -> dict[str, Any]:
    """A checkpoint after CUT steps, every rank its own sparsifier state; fresh objects finish the run."""
    model, sp, optimizer = build(name)
    changes: list = []
    held: list = []
    train(model, sp, optimizer, rank, world, range(CUT), changes, held)
    path = out / f"fsdp-{name}-rank{rank}.pt"
    torch.save({"sp": sp.state_dict()}, path)
    model_state, opt_state = model.state_dict(), optimizer.state_dict()
    dist.barrier()
    state = {"model": model_state, "opt": opt_state, "sp": torch.load(path, weights_only=True)["sp"]}
    model, sp, optimizer = build(name, state)
    train(model, sp, optimizer, rank, world, range(CUT, STEPS), changes, held)
    foreign = torch.load(out / f"fsdp-{name}-rank{(rank + 1) % world}.pt", weights_only=True)["sp"]
    fresh = build(name)[1]
    fresh.follow()
    try:
        fresh.load_state_dict(foreign)
        refused = "no error"
    except CompressionError as exc:
        refused = str(exc)
    return {"changes": changes, "refused_foreign": refused if sp.local_keys else "no local state"}


LOOP = {"hesso": {"warmup_epochs": 1, "pruning_epochs": 2, "periods": 2}, "csgd": {"centripetal": 0.5}}


def loop(name: str, rank: int, world: int, kind: str) -> tuple[dict[str, Any], nn.Module]:
    """`compress(name)` on this rank's half of the global batches (4 epochs of 5) under strategy `kind`."""
    shard_batches = [(x[rank::world], y[rank::world]) for x, y in global_batches()[:5]]
    copies = mock.Mock(wraps=device.shard_copy)
    with training_strategy(kind), mock.patch.object(device, "shard_copy", copies):
        result = compress(name, small_cnn(), example(), shard_batches, epochs=4, lr=0.05, **LOOP[name])
    info = result.info
    record = {
        "removable": info["removable"],
        "types": sorted({type(p).__name__ for p in result.model.parameters()}),
    }
    record["per_space"] = info.get("per_space")
    record["sharded_copies"] = copies.call_count
    return record, result.model


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    phases = ("fsdp", "ddp", "full", "after", "resumed", "uneven", "loop")
    report: dict[str, dict[str, Any]] = {k: {} for k in phases}
    for name in LOOP:
        (fsdp, a), (ddp, b) = loop(name, rank, world, "fsdp"), loop(name, rank, world, "ddp")
        diff = max(
            float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
        )
        report["loop"][name] = {"fsdp": fsdp, "ddp": ddp, "max_diff": diff, "slims_exactly": slims_exactly(a)}
    with training_strategy("fsdp"):
        try:
            compress("lorita", small_cnn(), example(), [global_batches()[0]])
            report["loop"]["refused"] = "no error"
        except CompressionError as exc:
            report["loop"]["refused"] = str(exc)
    for name in METHODS:
        report["fsdp"][name], plain = fsdp_run(name, rank, world)
        start = time.perf_counter()
        changes, ddp_model = run(name, rank, world)
        report["ddp"][name] = {"changes": changes, "seconds": time.perf_counter() - start}
        if rank == 0:
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(plain.state_dict().values(), ddp_model.state_dict().values(), strict=True)
            )
            report["full"][name] = {"slims_exactly": slims_exactly(plain), "max_diff_from_ddp": diff}
        report["after"][name] = after(name)
        report["resumed"][name] = resumed(name, rank, world, out)
        report["uneven"][name] = uneven(name, rank, world)
    (out / f"fsdp-rank{rank}.json").write_text(json.dumps(report, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
