"""ADC's cost side: the channel spaces the agent walks, the FLOPs model, and the budget with its clip.

A :class:`Budget` prices kept counts per space (FLOPs or predicted ms) and clips each action so the
budget stays reachable with later spaces at their minimum; :func:`uniform_counts`,
:func:`shrink_to_budget`, :func:`grow_to_budget` and :func:`aligned_counts` move whole policies within it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.compress.groups import run_with_hooks
from slimship.slimming.api import ChannelGroup, count_flops

KINDS = {nn.Conv1d: 1.0, nn.Conv2d: 1.0, nn.Conv3d: 1.0, nn.Linear: 0.0}

#: maps kept counts to counts the target runs well (identity: `list`)
Snap = Callable[[list[int]], list[int]]


@dataclass
class Space:
    """One step of the agent: a prunable channel space."""

    name: str
    groups: list[int]  # indices into the GroupSet
    kind: float  # 1 conv, 0 linear
    kernel: int
    flops: float  # dense FLOPs of the layers that produce or read it

    @property
    def n(self) -> int:
        return len(self.groups)


@dataclass
class FlopsModel:
    """FLOPs as a function of kept fractions: each conv/linear scales with its out- and in-space."""

    total: float
    fixed: float  # FLOPs that no prunable space touches
    layers: list[tuple[float, int | None, int | None]]  # (dense FLOPs, out space, in space)

    def flops(self, fractions: Sequence[float]) -> float:
        out = self.fixed
        for f, s_out, s_in in self.layers:
            out += (
                f * (1.0 if s_out is None else fractions[s_out]) * (1.0 if s_in is None else fractions[s_in])
            )
        return out


def layer_flops(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, float]:
    """FLOPs of every conv / linear module on `inputs` (2 per multiply-add), keyed by module name."""
    flops: dict[str, float] = {}

    def hook(name: str, per_output: float):
        def fn(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            flops[name] = 2.0 * out.numel() * per_output

        return fn

    hooks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks[m] = hook(name, m.in_features)
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            hooks[m] = hook(name, m.weight.shape[1] * math.prod(m.weight.shape[2:]))
    run_with_hooks(model, inputs, hooks)
    return flops


def build_spaces(
    model: nn.Module, inputs: tuple[Any, ...], groups: list[ChannelGroup], by_space: dict[str, list[int]]
) -> tuple[list[Space], FlopsModel]:
    """The agent's steps (in graph order) and the FLOPs model of `model`."""
    names = list(by_space)
    position = {s: i for i, s in enumerate(names)}
    out_space: dict[str, int] = {}
    in_space: dict[str, int] = {}
    for s in names:
        g = groups[by_space[s][0]]
        for pname, dim, _ in g.produce:
            if pname.endswith(".weight") and dim == 0:
                out_space.setdefault(pname[: -len(".weight")], position[s])
        for pname, dim, _ in g.consume:
            if pname.endswith(".weight") and dim == 1:
                in_space.setdefault(pname[: -len(".weight")], position[s])
    per_layer = layer_flops(model, inputs)
    total = float(count_flops(model, inputs))
    layers = [(f, out_space.get(n), in_space.get(n)) for n, f in per_layer.items()]
    fixed = max(total - sum(f for f, _, _ in layers), 0.0)
    spaces = []
    modules = dict(model.named_modules())
    for s in names:
        i = position[s]
        producers = [n for n, j in out_space.items() if j == i and n in modules]
        first = modules[producers[0]] if producers else None
        kind = next((v for cls, v in KINDS.items() if isinstance(first, cls)), 0.5)
        kernel = int(math.prod(first.weight.shape[2:])) if first is not None and first.weight.dim() > 2 else 1
        touched = sum(f for f, o, n_in in layers if i in (o, n_in))
        spaces.append(Space(s, list(by_space[s]), kind, kernel, touched))
    return spaces, FlopsModel(total, fixed, layers)


class Budget:
    """Cost of kept counts (FLOPs or predicted ms) and the clip that keeps the budget reachable."""

    def __init__(
        self, spaces: list[Space], cost: Callable[[list[float]], float], limit: float, min_keep: float
    ):
        self.spaces, self.cost, self.limit = spaces, cost, limit
        self.min_counts = [max(1, round(min_keep * s.n)) for s in spaces]

    def fractions(self, counts: Sequence[int]) -> list[float]:
        return [c / s.n for c, s in zip(counts, self.spaces, strict=True)]

    def clip(self, t: int, counts: list[int], wanted: int) -> int:
        """Largest count <= `wanted` at step t so the budget holds with later spaces at their minimum."""
        trial = [*list(counts[:t]), wanted, *self.min_counts[t + 1 :]]
        c = wanted
        while c > self.min_counts[t]:
            trial[t] = c
            if self.cost(self.fractions(trial)) <= self.limit * (1 + 1e-9):
                break
            c -= 1
        return max(c, self.min_counts[t])


#: maps kept counts to counts the target runs well (identity: `list`)


def uniform_counts(spaces: list[Space], budget: Budget, max_keep: float = 1.0) -> list[int]:
    """Kept counts as equal in fraction across spaces as the budget allows.

    The largest common fraction (on a fine grid) that meets the budget, then one channel at a time back
    to the space with the lowest kept fraction while the budget still holds (rounding in small spaces
    would otherwise leave part of the budget unused).
    """
    counts = list(budget.min_counts)
    for f in np.linspace(max_keep, 0.0, 401):
        trial = [max(m, min(s.n, round(f * s.n))) for s, m in zip(spaces, budget.min_counts, strict=True)]
        if budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
            counts = trial
            break
    cap = [max(1, math.floor(max_keep * s.n)) for s in spaces]
    while True:
        order = sorted(range(len(spaces)), key=lambda t: (counts[t] / spaces[t].n, t))
        for t in order:
            if counts[t] >= cap[t]:
                continue
            trial = list(counts)
            trial[t] += 1
            if budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
                counts = trial
                break
        else:
            return counts


def grow_to_budget(counts: list[int], budget: Budget, caps: list[int], snap: Snap = list) -> list[int]:
    """Scale every kept fraction up by the largest common factor (fine grid) within budget and caps."""
    best = list(counts)
    for factor in np.linspace(1.0, 4.0, 301)[1:]:
        trial = snap([min(cap, max(c, math.floor(factor * c))) for c, cap in zip(counts, caps, strict=True)])
        if budget.cost(budget.fractions(trial)) > budget.limit * (1 + 1e-9):
            break
        best = max(best, trial, key=sum)
    return best


def shrink_to_budget(counts: list[int], budget: Budget, snap: Snap = list) -> list[int]:
    """Scale every kept fraction by the largest common factor (fine grid) the budget allows.

    Always removes at least one channel (after `snap`, one step of its multiple) from the widest space
    above its minimum, so a loop progresses.
    """
    for factor in np.linspace(1.0, 0.0, 201)[1:]:
        raw = [max(m, math.floor(factor * c)) for c, m in zip(counts, budget.min_counts, strict=True)]
        trial = snap(raw)
        if trial != counts and budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
            return trial
    fallback = list(counts)
    while fallback != budget.min_counts:
        room = [f / sp.n if f > m else -1.0 for f, sp, m in zip(fallback, budget.spaces, budget.min_counts)]
        widest = max(range(len(room)), key=lambda t: (room[t], -t))
        fallback[widest] = max(budget.min_counts[widest], fallback[widest] - 1)
        if snap(fallback) != counts:
            return snap(fallback)
    return list(budget.min_counts)


def aligned_counts(counts: list[int], spaces: list[Space], multiple: int) -> list[int]:
    """Each kept count rounded down to a multiple of `multiple` (at least one multiple); a space that is
    kept whole or is no wider than the multiple stays as it is."""
    out = []
    for c, space in zip(counts, spaces, strict=True):
        if c >= space.n or space.n <= multiple:
            out.append(c)
        else:
            out.append(max(multiple, c - c % multiple))
    return out
