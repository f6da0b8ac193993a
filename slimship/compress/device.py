"""Where a sparsifier runs: the model's device, the module inside a DDP wrapper, and the process group.

Every data-dependent decision of a sparsifier goes through :func:`mean_across_ranks` before use, and every
random draw comes from a generator made by :func:`decision_generator`, so all ranks of a torchrun job
take the same decisions. Without an initialised process group these are no-ops.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel (or `model` itself)."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        model = model.module
    return model


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(unwrap(model).parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def score_dtype(device: torch.device) -> torch.dtype:
    """float64 for scores and norms where the device has it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed): only rank 0 writes files."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` averaged over all ranks (in place when distributed; returned unchanged otherwise)."""
    size = world_size()
    if size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= size
    return values


def decision_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on `device` seeded with `seed`: the same stream on every rank."""
    return torch.Generator(device=device).manual_seed(int(seed))


def broadcast_from_rank0(values: torch.Tensor) -> torch.Tensor:
    """`values` as rank 0 holds them (in place when distributed)."""
    if world_size() > 1:
        dist.broadcast(values, src=0)
    return values


def distributed() -> bool:
    """True inside an initialised process group (even of one process)."""
    return dist.is_available() and dist.is_initialized()


def broadcast_object_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself without a process group.

    Other ranks may pass None: they wait here until rank 0 has computed its value (e.g. a measurement).
    """
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module_from_rank0(model: nn.Module) -> nn.Module:
    """Every parameter and buffer of `model` as rank 0 holds them (in place; a no-op without a group)."""
    if distributed():
        for tensor in unwrap(model).state_dict().values():
            dist.broadcast(tensor, src=0)
    return model
