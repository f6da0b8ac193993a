"""Vectorised views of channel groups: one [groups, values] matrix per block of alike groups.

A *block* is the groups of one space whose slices have the same layout (same tensors, dims and number of
positions): usually one block per space. Each slice kind is a :class:`Slot` holding the tensor, the dim
and a ``[groups, positions]`` index tensor on the model's device, so reading every group of a block is
one ``index_select`` per tensor, writing one ``index_copy_``, and zeroing or scaling whole groups one
``masked_fill_`` / ``mul_`` per tensor, whatever the number of groups.

Under FSDP2 a parameter is a DTensor and this rank holds one chunk of it (see :mod:`.shards`). A slot then
reads and writes the local chunk only: along a dim the chunk does not split, it reads the group's values
in the chunk; along the split dim it reads ``[groups, width]`` with zeros at the positions other ranks
hold. Either way a per-group sum of the reads is this rank's share of the group's sum, and
:meth:`GroupViews.total` adds the shares over the ranks. Slots follow their parameters by name: a model
sharded after the views were built is picked up by :meth:`GroupViews.refresh`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimship.compress.device import score_dtype
from slimship.compress.shards import ShardInfo, local, shard_of, sum_over_shards
from slimship.errors import CompressionError
from slimship.slimming.api import ChannelGroup
from slimship.slimming.graph import get_tensor

Slice = tuple[str, int, tuple[int, ...]]


@dataclass
class Slot:
    """One tensor's slices for every group of a block: ``index[g]`` are group g's positions along `dim`."""

    name: str
    tensor: torch.Tensor
    dim: int
    index: torch.Tensor  # [groups, positions], long
    owner: torch.Tensor  # [tensor.shape[dim]]: the block row owning each position, or `groups` for none
    whole: bool = False  # the positions are 0, 1, ..., n-1 of the whole dim: read and write without indexing
    shard: ShardInfo | None = None  # this rank's chunk when the tensor is a sharded DTensor
    here: torch.Tensor | None = None  # split along `dim`: which flattened positions this rank holds
    at: torch.Tensor | None = None  # ... and where they are in the local chunk
    module: nn.Module | None = None  # the module holding the tensor as its attribute `attr`
    attr: str = ""

    @classmethod
    def build(cls, name: str, tensor: torch.Tensor, dim: int, positions: Sequence[tuple[int, ...]]) -> Slot:
        index = torch.tensor([list(p) for p in positions], dtype=torch.long, device=tensor.device)
        owner = torch.full((tensor.shape[dim],), len(positions), dtype=torch.long, device=tensor.device)
        owner[index.reshape(-1)] = torch.arange(len(positions), device=tensor.device).repeat_interleave(
            index.shape[1]
        )
        flat = [q for p in positions for q in p]
        slot = cls(name, tensor, dim, index, owner, whole=flat == list(range(tensor.shape[dim])))
        slot.bind(tensor)
        return slot

    def locate(self, model: nn.Module) -> None:
        """Remember the module of `model` that holds this slot's tensor (looked up again each step)."""
        prefix, _, self.attr = self.name.rpartition(".")
        self.module = model.get_submodule(prefix) if prefix else model

    def bind(self, tensor: torch.Tensor) -> None:
        """Follow `tensor` (the parameter now registered under this slot's name, e.g. its DTensor)."""
        self.tensor, self.shard = tensor, shard_of(self.name, tensor)
        self.here = self.at = None
        if self.split:
            flat = self.index.reshape(-1)
            held = (flat >= self.shard.start) & (flat < self.shard.end)
            self.here = held.nonzero().flatten()
            self.at = flat.index_select(0, self.here) - self.shard.start

    @property
    def split(self) -> bool:
        """The tensor is sharded along this slot's dim: each rank holds some of the groups' positions."""
        return self.shard is not None and self.shard.dim == self.dim

    @property
    def viewed(self) -> bool:
        """`read` returns a view (whole leading dim): writing into what it returns writes the tensor."""
        return self.whole and self.dim == 0 and not self.split

    def local(self) -> torch.Tensor:
        """The tensor's rows on this rank (the tensor itself unless sharded)."""
        return local(self.tensor)

    def width(self) -> int:
        """Values per group in this rank's reads (the whole group's unless sharded)."""
        shape = [s for d, s in enumerate(self.local().shape) if d != self.dim]
        return self.index.shape[1] * math.prod(shape)

    def read(self, source: torch.Tensor | None = None) -> torch.Tensor:
        """[groups, width] values of `source` (default: the tensor) at the groups' positions, as held on
        this rank (zeros at positions another rank holds).

        A slot covering a whole leading dim returns a view: clone it before changing the tensor."""
        src = local(self.tensor if source is None else source).detach()
        if self.split:
            shape = list(src.shape)
            shape[self.dim] = self.index.numel()
            picked = src.new_zeros(shape).index_copy_(
                self.dim, self.here, src.index_select(self.dim, self.at)
            )
        else:
            picked = src if self.whole else src.index_select(self.dim, self.index.reshape(-1))
        return picked.movedim(self.dim, 0).reshape(self.index.shape[0], -1)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Write [groups, width] `rows` into `target` (default: the tensor) at the groups' positions (the
        positions this rank holds)."""
        dst = local(self.tensor if target is None else target)
        rest = [s for d, s in enumerate(dst.shape) if d != self.dim]
        values = rows.reshape(self.index.numel(), *rest).movedim(0, self.dim).to(dst.dtype)
        if self.split:
            dst.index_copy_(self.dim, self.at, values.index_select(self.dim, self.here))
        elif self.whole:
            dst.copy_(values)
        else:
            dst.index_copy_(self.dim, self.index.reshape(-1), values)

    def held(self, rows: torch.Tensor) -> torch.Tensor:
        """[groups, width] `rows` with zeros where this rank does not hold the position (unsplit: all)."""
        if not self.split:
            return rows
        mask = torch.zeros(self.index.numel(), dtype=rows.dtype, device=rows.device)
        mask[self.here] = 1
        rest = rows.shape[1] // self.index.shape[1]
        return rows * mask.view(*self.index.shape, 1).expand(-1, -1, rest).reshape(rows.shape)

    def per_position(self, per_row: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """A per-row value spread over the positions along `dim`, shaped to broadcast against the local
        tensor."""
        padded = torch.cat([per_row, per_row.new_full((1,), fill)])
        owner = self.owner[self.shard.start : self.shard.end] if self.split else self.owner
        shape = [1] * self.tensor.dim()
        shape[self.dim] = -1
        return padded.index_select(0, owner).view(shape)


class Block:
    """Groups of one space sharing a layout; `rows` are their indices in the sparsifier's group order."""

    def __init__(self, model: nn.Module, space: str, rows: list[int], groups: list[ChannelGroup]) -> None:
        params = {id(p) for p in model.parameters()}
        self.space = space
        first = groups[0]
        device = next(model.parameters()).device
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.params: list[Slot] = []
        self.buffers: list[Slot] = []
        for k, (name, dim, _) in enumerate(first.produce):
            tensor = get_tensor(model, name)
            slot = Slot.build(name, tensor, dim, [g.produce[k][2] for g in groups])
            (self.params if id(tensor) in params else self.buffers).append(slot)
        self.stats = [self._slot(model, groups, "stats", k) for k in range(len(first.stats))]
        self.consume = [self._slot(model, groups, "consume", k) for k in range(len(first.consume))]
        for slot in self.all_slots():
            slot.locate(model)
        self.size = sum(s.width() for s in self.params)

    @staticmethod
    def _slot(model: nn.Module, groups: list[ChannelGroup], kind: str, k: int) -> Slot:
        name, dim, _ = getattr(groups[0], kind)[k]
        return Slot.build(name, get_tensor(model, name), dim, [getattr(g, kind)[k][2] for g in groups])

    def __len__(self) -> int:
        return int(self.rows.numel())

    def all_slots(self) -> list[Slot]:
        return self.params + self.buffers + self.stats + self.consume

    def matrix(self, grad: bool = False) -> torch.Tensor:
        """[groups, size] producing parameter values (or gradients; missing gradients read as zero), as
        held on this rank (see :meth:`Slot.read`)."""
        parts = []
        for s in self.params:
            source = s.tensor.grad if grad else s.tensor
            parts.append(s.read(source) if source is not None else s.read().new_zeros(len(self), s.width()))
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def set_matrix(self, values: torch.Tensor, grad: bool = False) -> None:
        """Write [groups, size] `values` into the producing parameters (or their gradients)."""
        offset = 0
        for s in self.params:
            width = s.width()
            if grad and s.tensor.grad is None:
                s.tensor.grad = torch.zeros_like(s.tensor)
            s.write(values[:, offset : offset + width], s.tensor.grad if grad else None)
            offset += width

    def full(self) -> list[torch.Tensor]:
        """Values of every slice (parameters, buffers, statistics), one [groups, width] matrix per slot."""
        return [s.read().clone() for s in self.params + self.buffers + self.stats]

    @torch.no_grad()
    def set_full(self, values: list[torch.Tensor]) -> None:
        for s, v in zip(self.params + self.buffers + self.stats, values, strict=True):
            s.write(v)

    def slots(self, grads: bool = False, consumers: bool = False) -> list[Slot]:
        """The slots a zeroing touches: parameters, buffers (not for gradients), consumers if asked."""
        return self.params + ([] if grads else self.buffers) + (self.consume if consumers else [])

    @torch.no_grad()
    def zero(self, masks: dict[int, torch.Tensor], grads: bool = False, consumers: bool = False) -> None:
        """Zero the values (or gradients) where `masks` (slot id -> positions mask) is True."""
        for s in self.slots(grads, consumers):
            target = s.tensor.grad if grads else s.tensor
            if target is not None:
                local(target).masked_fill_(masks[id(s)], 0)

    @torch.no_grad()
    def scale(self, factors: torch.Tensor) -> None:
        """Multiply each group's producing slices (buffers included) by its factor ([groups])."""
        for s in self.params + self.buffers:
            s.local().mul_(s.per_position(factors.to(s.tensor.dtype), 1.0))

    def consumer_sq(self) -> torch.Tensor:
        """Squared L2 norm of each group's consuming slices ([groups]; this rank's share when sharded)."""
        dtype = score_dtype(self.rows.device)
        parts = [s.read().to(dtype).pow(2).sum(1) for s in self.consume]
        return (
            sum(parts[1:], parts[0])
            if parts
            else torch.zeros(len(self), dtype=dtype, device=self.rows.device)
        )


class GroupViews:
    """Every block of a list of groups (ordered by space); per-group results come back as [groups] tensors."""

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup]) -> None:
        self.n = len(groups)
        self.model = model
        self.group: object | None = None  # the process group the parameters are sharded over, if they are
        self.device = next(model.parameters()).device
        self.dtype = score_dtype(self.device)
        layouts: dict[tuple, list[int]] = {}
        for i, g in enumerate(groups):
            key = (
                g.space,
                *(
                    (kind, n, d, len(p))
                    for kind in ("produce", "stats", "consume")
                    for n, d, p in getattr(g, kind)
                ),
            )
            layouts.setdefault(key, []).append(i)
        self.blocks = [Block(model, groups[r[0]].space, r, [groups[i] for i in r]) for r in layouts.values()]
        self._masks_key: tuple[torch.Tensor, int] | None = None
        self._masks: dict[int, torch.Tensor] = {}
        self.sizes = self.gather(lambda b: torch.full((len(b),), float(b.size), device=self.device))

    def __iter__(self) -> Iterator[Block]:
        return iter(self.blocks)

    def refresh(self, relocate: bool = False) -> bool:
        """Follow the parameters registered under the slots' names now (a model sharded with fully_shard
        after the views were built has new DTensor parameters); True when some slot moved. `relocate`
        looks the names up again in ``self.model`` (another module of the same structure)."""
        moved = False
        for b in self.blocks:
            for s in b.all_slots():
                if relocate:
                    s.locate(self.model)
                tensor = getattr(s.module, s.attr)  # a few dict look-ups: cheap enough for every step
                if tensor is not s.tensor:
                    s.bind(tensor)
                    moved = True
        if moved:
            reduced = [s for b in self.blocks for s in b.params + b.consume]
            groups = {id(s.shard.group) if s.shard else None for s in reduced}
            if len(groups) > 1:
                raise CompressionError(
                    "the channel groups' parameters are partly sharded ("
                    + ", ".join(sorted({s.name for s in reduced if s.shard is None}))
                    + " not); shard all of them (fully_shard on the root module covers every parameter)"
                )
            self.group = next((s.shard.group for s in reduced if s.shard is not None), None)
            self._masks_key, self._masks = None, {}
        return moved

    def total(self, per_block) -> torch.Tensor:
        """[groups] sums from a function giving each block's [rows] sums over the values this rank holds,
        added over the ranks the parameters are sharded across."""
        return sum_over_shards(self.gather(per_block), self.group)

    def gather(self, per_block) -> torch.Tensor:
        """[groups] tensor from a function giving each block's [rows] values."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            out.index_copy_(0, b.rows, per_block(b).to(self.dtype))
        return out

    def norms(self, consumers: bool = False) -> torch.Tensor:
        """L2 norm of each group's producing parameters (and consuming ones if asked)."""

        def sq(b: Block) -> torch.Tensor:
            sq = b.matrix().to(self.dtype).pow(2).sum(1)
            return sq + b.consumer_sq() if consumers else sq

        return self.total(sq).sqrt()

    def taylor(self) -> torch.Tensor:
        """First-order Taylor score |x . grad| of each group (needs the gradients of a step)."""
        return self.total(
            lambda b: (b.matrix().to(self.dtype) * b.matrix(grad=True).to(self.dtype)).sum(1)
        ).abs()

    def is_zero(self) -> torch.Tensor:
        """True for each group whose producing parameters are all exactly zero."""
        return self.total(lambda b: (b.matrix() != 0).sum(1)) == 0

    def zero(self, mask: torch.Tensor, grads: bool = False, consumers: bool = False) -> None:
        """Zero the values (or gradients) of the groups where `mask` ([groups] bool) is True."""
        masks = self.position_masks(mask)
        for b in self.blocks:
            b.zero(masks, grads=grads, consumers=consumers)

    def position_masks(self, mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Per slot, `mask` spread over the slot's positions; kept until `mask` changes (its version moves
        on every in-place change), so holding zeros each step costs one masked_fill per tensor."""
        key = (mask, mask._version)
        if self._masks_key is None or self._masks_key[0] is not key[0] or self._masks_key[1] != key[1]:
            self._masks = {
                id(s): s.per_position(mask[b.rows], False)
                for b in self.blocks
                for s in b.slots(consumers=True)
            }
            self._masks_key = key
        return self._masks

    def scale(self, factors: torch.Tensor) -> None:
        for b in self.blocks:
            b.scale(factors[b.rows])
