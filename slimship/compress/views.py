"""Vectorised views of channel groups: one [groups, values] matrix per block of alike groups.

A *block* is the groups of one space whose slices have the same layout (same tensors, dims and number of
positions): usually one block per space. Each slice kind is a :class:`Slot` holding the tensor, the dim
and a ``[groups, positions]`` index tensor on the model's device, so reading every group of a block is
one ``index_select`` per tensor, writing one ``index_copy_``, and zeroing or scaling whole groups one
``masked_fill_`` / ``mul_`` per tensor, whatever the number of groups.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from slimship.compress.device import score_dtype
from slimship.slimming.api import ChannelGroup
from slimship.slimming.graph import get_tensor

Slice = tuple[str, int, tuple[int, ...]]


@dataclass
class Slot:
    """One tensor's slices for every group of a block: ``index[g]`` are group g's positions along `dim`."""

    tensor: torch.Tensor
    dim: int
    index: torch.Tensor  # [groups, positions], long
    owner: torch.Tensor  # [tensor.shape[dim]]: the block row owning each position, or `groups` for none
    whole: bool = False  # the positions are 0, 1, ..., n-1 of the whole dim: read and write without indexing

    @classmethod
    def build(cls, tensor: torch.Tensor, dim: int, positions: Sequence[tuple[int, ...]]) -> Slot:
        index = torch.tensor([list(p) for p in positions], dtype=torch.long, device=tensor.device)
        owner = torch.full((tensor.shape[dim],), len(positions), dtype=torch.long, device=tensor.device)
        owner[index.reshape(-1)] = torch.arange(len(positions), device=tensor.device).repeat_interleave(
            index.shape[1]
        )
        flat = [q for p in positions for q in p]
        return cls(tensor, dim, index, owner, whole=flat == list(range(tensor.shape[dim])))

    @property
    def viewed(self) -> bool:
        """`read` returns a view (whole leading dim): writing into what it returns writes the tensor."""
        return self.whole and self.dim == 0

    def width(self) -> int:
        return self.index.shape[1] * self.tensor[(slice(None),) * self.dim + (0,)].numel()

    def read(self, source: torch.Tensor | None = None) -> torch.Tensor:
        """[groups, width] values of `source` (default: the tensor) at the groups' positions.

        A slot covering a whole leading dim returns a view: clone it before changing the tensor."""
        src = (self.tensor if source is None else source).detach()
        picked = src if self.whole else src.index_select(self.dim, self.index.reshape(-1))
        return picked.movedim(self.dim, 0).reshape(self.index.shape[0], -1)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Write [groups, width] `rows` into `target` (default: the tensor) at the groups' positions."""
        dst = self.tensor if target is None else target
        rest = [s for d, s in enumerate(dst.shape) if d != self.dim]
        values = rows.reshape(self.index.numel(), *rest).movedim(0, self.dim).to(dst.dtype)
        if self.whole:
            dst.copy_(values)
        else:
            dst.index_copy_(self.dim, self.index.reshape(-1), values)

    def per_position(self, per_row: torch.Tensor, fill: float | bool) -> torch.Tensor:
        """A per-row value spread over the positions along `dim`, shaped to broadcast against the tensor."""
        padded = torch.cat([per_row, per_row.new_full((1,), fill)])
        shape = [1] * self.tensor.dim()
        shape[self.dim] = -1
        return padded.index_select(0, self.owner).view(shape)


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
            slot = Slot.build(tensor, dim, [g.produce[k][2] for g in groups])
            (self.params if id(tensor) in params else self.buffers).append(slot)
        self.stats = [self._slot(model, groups, "stats", k) for k in range(len(first.stats))]
        self.consume = [self._slot(model, groups, "consume", k) for k in range(len(first.consume))]
        self.size = sum(s.width() for s in self.params)

    @staticmethod
    def _slot(model: nn.Module, groups: list[ChannelGroup], kind: str, k: int) -> Slot:
        name, dim, _ = getattr(groups[0], kind)[k]
        return Slot.build(get_tensor(model, name), dim, [getattr(g, kind)[k][2] for g in groups])

    def __len__(self) -> int:
        return int(self.rows.numel())

    def matrix(self, grad: bool = False) -> torch.Tensor:
        """[groups, size] producing parameter values (or gradients; missing gradients read as zero)."""
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
                target.masked_fill_(masks[id(s)], 0)

    @torch.no_grad()
    def scale(self, factors: torch.Tensor) -> None:
        """Multiply each group's producing slices (buffers included) by its factor ([groups])."""
        for s in self.params + self.buffers:
            s.tensor.mul_(s.per_position(factors.to(s.tensor.dtype), 1.0))

    def consumer_sq(self) -> torch.Tensor:
        """Squared L2 norm of each group's consuming slices ([groups])."""
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

    def gather(self, per_block) -> torch.Tensor:
        """[groups] tensor from a function giving each block's [rows] values."""
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            out.index_copy_(0, b.rows, per_block(b).to(self.dtype))
        return out

    def norms(self, consumers: bool = False) -> torch.Tensor:
        """L2 norm of each group's producing parameters (and consuming ones if asked)."""

        def norm(b: Block) -> torch.Tensor:
            sq = b.matrix().to(self.dtype).pow(2).sum(1)
            return (sq + b.consumer_sq() if consumers else sq).sqrt()

        return self.gather(norm)

    def taylor(self) -> torch.Tensor:
        """First-order Taylor score |x . grad| of each group (needs the gradients of a step)."""
        return self.gather(
            lambda b: (b.matrix().to(self.dtype) * b.matrix(grad=True).to(self.dtype)).sum(1).abs()
        )

    def is_zero(self) -> torch.Tensor:
        """True for each group whose producing parameters are all exactly zero."""
        return self.gather(lambda b: (b.matrix() == 0).all(1)).bool()

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
