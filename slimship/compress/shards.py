"""Where a parameter lives under FSDP2 (``torch.distributed.fsdp.fully_shard``): a DTensor shard or a plain
tensor.

A sparsifier reads and writes channel slices of parameters. Under FSDP2 each parameter is a ``DTensor``
whose rank holds one chunk of it along a dim (``Shard(d)``, torch.chunk sizes); the sparsifier asks the
parameter where it lives (:func:`shard_of`) and works on its local chunk (:func:`local`), summing group
statistics over the shards with :func:`sum_over_shards`. Only one-dimensional meshes with ``Shard`` or
``Replicate`` placements are supported; anything else is refused with a message.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimship.errors import CompressionError

#: what to do instead, said whenever a sparsifier meets a model it cannot follow into its shards
BUILD_ORDER = (
    "build the sparsifier on the plain model first, then shard it: sp = sparsifier(name, model, example, "
    "total_steps=...); fully_shard(...); optimizer = ...(model.parameters()); the sparsifier follows the "
    "parameters into their shards at its first call"
)


@dataclass(frozen=True)
class ShardInfo:
    """This rank's chunk of a parameter: rows ``start:end`` of dim `dim`, among the ranks of `group`."""

    dim: int
    start: int
    end: int
    group: Any  # the mesh's process group


def _dtensor_module() -> Any:
    """torch.distributed.tensor if something loaded it (a DTensor exists only then; importing it costs
    seconds at start-up, so it is never imported here)."""
    return sys.modules.get("torch.distributed.tensor")


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (a parameter under FSDP2 or another DTensor engine)."""
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


def sharded_model(model: nn.Module) -> bool:
    """True when some parameter of `model` is already a DTensor (the model was sharded)."""
    return any(is_sharded(p) for p in model.parameters())


def refuse_sharded(model: nn.Module, who: str) -> None:
    """CompressionError when `model` is already sharded: the channel graph is traced on the plain model."""
    if sharded_model(model):
        raise CompressionError(
            f"{who}: the model is already sharded (its parameters are DTensors, e.g. after fully_shard); "
            f"the channel groups are traced on the plain model, so {BUILD_ORDER}"
        )


def shard_of(name: str, tensor: torch.Tensor) -> ShardInfo | None:
    """This rank's chunk of `tensor` (None for a plain tensor or a replicated DTensor); a layout other
    than one ``Shard(d)`` on a one-dimensional mesh is refused, naming the parameter."""
    if not is_sharded(tensor):
        return None
    mesh, placements = tensor.device_mesh, tensor.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise CompressionError(
            f"parameter {name!r} is a DTensor on a {mesh.ndim}-dimensional mesh {tuple(placements)}; "
            "sparsifiers follow one-dimensional meshes only (FSDP2's fully_shard, Shard or Replicate)"
        )
    (placement,) = placements
    module = _dtensor_module()
    if isinstance(placement, module.Replicate):
        return None
    if type(placement) is not module.Shard:
        raise CompressionError(
            f"parameter {name!r} is placed as {placement}; sparsifiers follow Shard(d) and Replicate only"
        )
    dim, n, count = placement.dim, tensor.shape[placement.dim], mesh.size()
    chunk = math.ceil(n / count)
    start = min(mesh.get_local_rank() * chunk, n)
    end = min(start + chunk, n)
    if tensor.to_local().shape[dim] != end - start:
        raise CompressionError(
            f"parameter {name!r}: this rank holds {tensor.to_local().shape[dim]} rows of dim {dim}, not the "
            f"{end - start} of an even torch.chunk split; sparsifiers follow torch.chunk shards only"
        )
    return ShardInfo(dim, start, end, mesh.get_group())


def local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """The rows this rank holds (the DTensor's local tensor, which writes go into), or `tensor` itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def sum_over_shards(values: torch.Tensor, group: Any) -> torch.Tensor:
    """`values` summed over the ranks of `group` (in place; unchanged without a group)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=group)
    return values


def shard_key(group: Any) -> list[int] | None:
    """[this rank's place, ranks] in `group` (None without one): whose chunks a saved state holds."""
    return None if group is None else [dist.get_rank(group), dist.get_world_size(group)]
