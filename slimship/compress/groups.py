"""Channel-group helpers: group slices, norms, zeroing, `GroupTensors`, the prunable groups of a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from slimship.errors import CompressionError
from slimship.slimming.api import ChannelGroup, GroupSet, find_groups
from slimship.slimming.graph import get_tensor, slice_index


# ---- groups ----------------------------------------------------------------------------------------
def as_groups(groups: GroupSet | Sequence[ChannelGroup]) -> list[ChannelGroup]:
    return list(groups.groups) if isinstance(groups, GroupSet) else list(groups)


def group_slices(
    model: nn.Module, group: ChannelGroup, params_only: bool = True
) -> list[tuple[torch.Tensor, tuple[Any, ...]]]:
    """(tensor, index) of each producing slice of `group`; buffers (running means) only if asked."""
    params = {id(p) for p in model.parameters()}
    out = []
    for name, dim, positions in group.produce:
        t = get_tensor(model, name)
        if params_only and id(t) not in params:
            continue
        out.append((t, slice_index(dim, positions, t.dim())))
    return out


def group_vector(model: nn.Module, group: ChannelGroup, grad: bool = False) -> torch.Tensor:
    """The group's parameter slices (or their gradients) flattened into one vector."""
    parts = []
    for t, idx in group_slices(model, group):
        src = t.grad if grad else t
        parts.append(torch.zeros(t[idx].numel()) if src is None else src.detach()[idx].reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.no_grad()
def group_norms(model: nn.Module, groups: GroupSet | Sequence[ChannelGroup]) -> torch.Tensor:
    """L2 norm of each group's producing parameter slices (float64, one entry per group)."""
    return torch.tensor([float(group_vector(model, g).double().norm()) for g in as_groups(groups)])


@torch.no_grad()
def zero_groups(model: nn.Module, groups: Sequence[ChannelGroup]) -> None:
    """Set every producing slice (parameters and running means) of `groups` to exactly zero."""
    for g in groups:
        for name, dim, positions in g.produce:
            t = get_tensor(model, name)
            t[slice_index(dim, positions, t.dim())] = 0


def zero_mask(model: nn.Module, groups: GroupSet | Sequence[ChannelGroup]) -> list[bool]:
    """True for each group whose producing parameter slices are all exactly zero."""
    return [bool((group_vector(model, g) == 0).all()) for g in as_groups(groups)]


def prunable_groups(
    model: nn.Module, example_inputs: Any, spaces: Sequence[str] | None = None
) -> tuple[GroupSet, dict[str, list[int]]]:
    """find_groups plus the spaces with at least two groups (a space keeps one channel at least).

    `spaces` restricts the spaces used (unknown names raise CompressionError listing the known ones).
    """
    found = find_groups(model, example_inputs)
    by_space = {s: idx for s, idx in found.by_space.items() if len(idx) >= 2}
    if spaces is not None:
        missing = sorted(set(spaces) - set(found.by_space))
        if missing:
            raise CompressionError(
                f"spaces {missing} are not prunable channel spaces of this model; "
                f"known: {sorted(found.by_space)}"
            )
        by_space = {s: idx for s, idx in by_space.items() if s in set(spaces)}
    if not by_space:
        raise CompressionError(
            "the model has no prunable channel groups (every space is pinned: "
            f"{found.pinned_spaces or 'no channel spaces found'})"
        )
    return found, by_space


def group_sparsity(model: nn.Module, groups: GroupSet | Sequence[ChannelGroup]) -> float:
    """Fraction of `groups` that are exactly zero."""
    mask = zero_mask(model, groups)
    return sum(mask) / max(len(mask), 1)


def run_with_hooks(
    model: nn.Module, inputs: tuple[Any, ...], hooks: dict[nn.Module, Callable[..., None]]
) -> None:
    """One no-grad forward of `model` on `inputs` with each forward hook of `hooks` (module -> hook)
    registered for that pass only."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks.items()]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()


class GroupTensors:
    """Fast access to the parameter slices of a fixed list of groups on one model.

    Built once per training run; the slices index the model's own parameters, so a checkpoint loaded
    with ``load_state_dict`` (which copies in place) is seen immediately.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup]) -> None:
        self.model = model
        self.groups = list(groups)
        self.slices = [group_slices(model, g) for g in self.groups]
        self.buffers = [
            [(t, idx) for t, idx in group_slices(model, g, params_only=False) if not t.requires_grad]
            for g in self.groups
        ]

    def __len__(self) -> int:
        return len(self.groups)

    def vector(self, i: int, grad: bool = False) -> torch.Tensor:
        parts = []
        for t, idx in self.slices[i]:
            src = t.grad if grad else t
            parts.append(torch.zeros(t[idx].numel()) if src is None else src.detach()[idx].reshape(-1))
        return torch.cat(parts)

    def norm(self, i: int) -> float:
        return float(self.vector(i).double().norm())

    def norms(self) -> torch.Tensor:
        return torch.tensor([self.norm(i) for i in range(len(self))], dtype=torch.float64)

    def sizes(self) -> list[int]:
        return [sum(t[idx].numel() for t, idx in s) for s in self.slices]

    @torch.no_grad()
    def set_vector(self, i: int, vector: torch.Tensor) -> None:
        offset = 0
        for t, idx in self.slices[i]:
            n = t[idx].numel()
            t[idx] = vector[offset : offset + n].reshape(t[idx].shape).to(t.dtype)
            offset += n

    @torch.no_grad()
    def scale(self, i: int, factor: float) -> None:
        for t, idx in self.slices[i]:
            t[idx] = t[idx] * factor

    @torch.no_grad()
    def zero(self, i: int) -> None:
        for t, idx in self.slices[i] + self.buffers[i]:
            t[idx] = 0

    @torch.no_grad()
    def zero_grad(self, i: int) -> None:
        for t, idx in self.slices[i]:
            if t.grad is not None:
                t.grad[idx] = 0

    @torch.no_grad()
    def add_grad(self, i: int, vector: torch.Tensor) -> None:
        offset = 0
        for t, idx in self.slices[i]:
            n = t[idx].numel()
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            t.grad[idx] = t.grad[idx] + vector[offset : offset + n].reshape(t[idx].shape)
            offset += n

    def is_zero(self, i: int) -> bool:
        return bool((self.vector(i) == 0).all())

    @torch.no_grad()
    def set_grad(self, i: int, vector: torch.Tensor) -> None:
        offset = 0
        for t, idx in self.slices[i]:
            n = t[idx].numel()
            if t.grad is None:
                t.grad = torch.zeros_like(t)
            t.grad[idx] = vector[offset : offset + n].reshape(t[idx].shape).to(t.dtype)
            offset += n

    def shape_key(self, i: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of the group's producing slices (parameters, buffers) and statistics."""
        g = self.groups[i]
        return tuple((len(p[2]), p[1]) for p in g.produce + g.stats)
