"""ADC policies: which channel groups a policy removes, applied by zeroing them (slimming removes zeros).

A policy keeps a count of groups per space; within a space the least important groups go first
(:func:`importance_scores`). :class:`AdcPolicy` records the groups removed, so :func:`apply_policy`
zeros the same groups on the user's model without the scores.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress.adc.budget import Space
from slimship.compress.checks import check_module, refuse
from slimship.compress.device import device_of, mean_across_ranks, score_dtype, unwrap
from slimship.compress.groups import GroupTensors, prunable_groups
from slimship.compress.training import Batch
from slimship.errors import CompressionError
from slimship.slimming.api import ChannelGroup
from slimship.slimming.trace import as_input_tuple

IMPORTANCES = ("magnitude", "taylor")


@dataclass(frozen=True)
class AdcPolicy:
    """Per channel space: groups kept, groups in all, and the positions (in the space's group order as
    ``find_groups`` lists it) of the groups removed."""

    kept: dict[str, int]
    sizes: dict[str, int]
    removed: dict[str, list[int]]

    @property
    def fractions(self) -> dict[str, float]:
        """Kept fraction per space."""
        return {s: c / self.sizes[s] for s, c in self.kept.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Pruner:
    """Applies kept counts per space to a model by zeroing each space's least important groups."""

    def __init__(
        self, model: nn.Module, groups: list[ChannelGroup], spaces: list[Space], scores: torch.Tensor
    ):
        self.model = model
        self.spaces = spaces
        self.tensors = GroupTensors(model, groups)
        self.order = [sorted(s.groups, key=lambda i: (float(scores[i]), i)) for s in spaces]
        self.dense = copy.deepcopy(model.state_dict())

    def pruned(self, counts: Sequence[int]) -> list[int]:
        """Indices of the groups removed under `counts` (least important first in each space)."""
        out = []
        for order, c in zip(self.order, counts, strict=True):
            out += order[: len(order) - c]
        return out

    def apply(self, counts: Sequence[int]) -> list[int]:
        """Restore the dense weights and zero the groups `counts` removes; returns their indices."""
        self.model.load_state_dict(self.dense)
        removed = self.pruned(counts)
        for i in removed:
            self.tensors.zero(i)
        return removed

    def policy(self, counts: Sequence[int]) -> AdcPolicy:
        """`counts` as an :class:`AdcPolicy` (the removed groups as positions within their space)."""
        removed: dict[str, list[int]] = {}
        for space, order, c in zip(self.spaces, self.order, counts, strict=True):
            position = {g: p for p, g in enumerate(space.groups)}
            removed[space.name] = sorted(position[g] for g in order[: len(order) - c])
        return AdcPolicy(
            kept={s.name: int(c) for s, c in zip(self.spaces, counts, strict=True)},
            sizes={s.name: s.n for s in self.spaces},
            removed=removed,
        )


def apply_policy(model: nn.Module, example_inputs: Any, policy: AdcPolicy) -> nn.Module:
    """Zero, in place, the channel groups `policy` removes from `model` (DDP-wrapped or not); returns
    `model`. ``slimship.slim`` then removes them. Raises CompressionError when a space of the policy is
    not a prunable space of this model or has another number of groups, or an argument is of a wrong type."""
    check_module("apply_policy model", model)
    if not isinstance(policy, AdcPolicy):
        raise refuse("apply_policy policy", "an AdcPolicy (adc_search(...).policy)", policy)
    target = unwrap(model)
    found, by_space = prunable_groups(target, as_input_tuple(example_inputs), spaces=list(policy.kept))
    for space, size in policy.sizes.items():
        have = len(by_space.get(space, []))
        if have != size:
            raise CompressionError(
                f"policy space {space!r} has {size} channel groups but this model has {have}: "
                "apply a policy to the model (architecture) it was searched on"
            )
    chosen = [found.groups[by_space[s][p]] for s, positions in policy.removed.items() for p in positions]
    tensors = GroupTensors(target, chosen)
    for i in range(len(tensors)):
        tensors.zero(i)
    return model


def importance_scores(
    model: nn.Module, groups: list[ChannelGroup], kind: str, batches: list[Batch]
) -> torch.Tensor:
    """Per group: L2 norm of its weights (magnitude) or |sum(w * dL/dw)| summed over batches (Taylor,
    averaged across ranks: each rank sees its own batches)."""
    tensors = GroupTensors(model, groups)
    if kind == "magnitude":
        return tensors.norms()
    if kind != "taylor":
        raise CompressionError(f"option 'importance' must be one of {IMPORTANCES}, got {kind!r}")
    model.eval()
    device = device_of(model)
    scores = torch.zeros(len(groups), dtype=score_dtype(device), device=device)
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        for i in range(len(groups)):
            scores[i] += (tensors.vector(i) * tensors.vector(i, grad=True)).sum().abs()
    model.zero_grad(set_to_none=True)
    return mean_across_ranks(scores)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: list[Batch], tensors: GroupTensors, removed: Sequence[int]
) -> None:
    """Re-estimate BatchNorm running statistics of the pruned network on `batches` (no weight change)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    device = device_of(model)
    for x, _ in batches:
        model(x.to(device))
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)
    for i in removed:
        tensors.zero(i)
