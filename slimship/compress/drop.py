"""Drop Pruning: iterative prune-retrain with stochastic drop-out and drop-in of whole channel groups.

The pruning stage is cut into ``rounds``. At the start of each round, every space first drops back in
each pruned group with probability ``drop_in`` (never in the last round), with the values it had when it
was dropped (``revive="restore"``; dropping masks a group, it does not forget it) or as a noisy copy of
a random active group of the same space (``revive="copy"``), then drops out enough active groups to reach
this round's share of the space's ``target``: they are drawn without replacement from the ``pool`` x
needed lowest-norm active groups with probability inversely proportional to their norm (the last round
takes the lowest-norm ones: nothing drops back in after it), and set to exactly zero.
Pruned groups are held at zero (gradients and values) while the rest retrains; fine-tuning ends the run.
Randomness comes from a generator seeded by ``(seed, round)``, so a resumed run draws the same groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimship.compress.base import (
    Batch,
    CompressResult,
    Training,
    check_choice,
    check_fraction,
    register,
    working_copy,
)
from slimship.compress.hspg import CRITERIA, GroupSparsifier, _finish, _stage_steps, _steps_per_epoch
from slimship.errors import CompressionError
from slimship.slimming.api import copy_group

log = logging.getLogger(__name__)

#: how a dropped-in group comes back: its values from when it was dropped, or a noisy copy of a live group
REVIVALS = ("restore", "copy")


def _slices(sp: GroupSparsifier, i: int) -> list[tuple[torch.Tensor, tuple[Any, ...]]]:
    return sp.tensors.slices[i] + sp.tensors.buffers[i]


def _snapshot(sp: GroupSparsifier, i: int) -> list[torch.Tensor]:
    """The values (statistics included) of group `i` as it is dropped out."""
    return [t[idx].detach().clone() for t, idx in _slices(sp, i)]


@torch.no_grad()
def _restore(sp: GroupSparsifier, i: int, values: list[torch.Tensor]) -> None:
    for (t, idx), v in zip(_slices(sp, i), values, strict=True):
        t[idx] = v


def _revive(model: nn.Module, sp: GroupSparsifier, i: int, donor: int, gen: torch.Generator) -> None:
    """Re-initialise group `i` as a noisy copy of active group `donor` (statistics included)."""
    a, b = sp.tensors.groups[donor], sp.tensors.groups[i]
    if sp.tensors.shape_key(donor) == sp.tensors.shape_key(i):
        copy_group(model, a, b)
        vector = sp.tensors.vector(i)
    else:
        vector = torch.randn(sp.sizes[i], generator=gen) * sp.tensors.vector(donor).std()
    noise = torch.randn(vector.shape, generator=gen) * 0.1 * float(vector.std() if vector.numel() > 1 else 1)
    sp.tensors.set_vector(i, vector + noise)


def _round(
    model: nn.Module,
    sp: GroupSparsifier,
    state: dict[str, Any],
    r: int,
    rounds: int,
    drop_in: float,
    pool: float,
    seed: int,
    revive: str,
    criterion: str,
) -> None:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
    pruned = set(state["zero"])
    revived = dropped = 0
    for space, members in sp.spaces.items():
        mine = [i for i in members if i in pruned]
        active = [i for i in members if i not in pruned]
        if r < rounds - 1 and mine and active:
            back = [
                i
                for i, u in zip(mine, torch.rand(len(mine), generator=gen).tolist(), strict=True)
                if u < drop_in
            ]
            for i in back:
                donor = active[int(torch.randint(len(active), (1,), generator=gen))]
                if revive == "restore" and str(i) in state["dropped_values"]:
                    _restore(sp, i, state["dropped_values"].pop(str(i)))
                else:
                    _revive(model, sp, i, donor, gen)
                pruned.discard(i)
            revived += len(back)
        active = [i for i in members if i not in pruned]
        need = round(sp.quota[space] * (r + 1) / rounds) - (len(members) - len(active))
        if need <= 0:
            continue
        ranked = sp.least_salient(active, criterion)
        last = r == rounds - 1  # the final cut is not drawn: nothing can drop back in after it
        candidates = ranked[: need if last else min(len(ranked), max(need, math.ceil(pool * need)))]
        weights = torch.tensor([1.0 / (sp.magnitude(i) + 1e-12) for i in candidates], dtype=torch.float64)
        chosen = torch.multinomial(weights, need, replacement=False, generator=gen).tolist()
        for k in chosen:
            pruned.add(candidates[k])
            if revive == "restore" and r < rounds - 1:
                state["dropped_values"][str(candidates[k])] = _snapshot(sp, candidates[k])
            sp.tensors.zero(candidates[k])
        dropped += need
    state["zero"] = sorted(pruned)
    state["revived"] = state.get("revived", 0) + revived
    log.info("drop: round %d/%d: %d groups dropped out, %d dropped back in", r + 1, rounds, dropped, revived)


@register("drop", training=Training())
def drop(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    target: float = 0.5,
    space_targets: dict[str, float] | None = None,
    spaces: list[str] | None = None,
    pruning_epochs: int | None = None,
    rounds: int = 5,
    drop_in: float = 0.2,
    pool: float = 2.0,
    revive: str = "restore",
    criterion: str = "magnitude",
) -> CompressResult:
    """Iterative stochastic prune-retrain on channel groups towards `target` group sparsity per space."""
    check_fraction("drop_in", drop_in, high_open=False)
    check_choice("criterion", criterion, CRITERIA)
    check_choice("revive", revive, REVIVALS)
    if rounds < 1 or pool < 1:
        raise CompressionError(f"rounds must be >= 1 and pool >= 1, got rounds={rounds}, pool={pool}")
    model = working_copy(model)
    sp = GroupSparsifier(model, example_inputs, target, spaces, space_targets)
    n = _steps_per_epoch(train)
    if pruning_epochs is None:
        pruning_epochs = max(rounds, round(0.6 * training.epochs))
    _, end = _stage_steps(training.epochs, 0, pruning_epochs, n, "pruning_epochs")
    starts = [round(r * end / rounds) for r in range(rounds)]
    state: dict[str, Any] = {"zero": [], "round": -1, "revived": 0, "dropped_values": {}}

    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        if step in starts and starts.index(step) > state["round"]:
            state["round"] = starts.index(step)
            _round(m, sp, state, state["round"], rounds, drop_in, pool, training.seed, revive, criterion)
        sp.hold_zero_grads(state)

    def step_hook(m: nn.Module, epoch: int, step: int) -> None:
        sp.hold_zeros(state)

    history = training.run(
        model,
        train,
        desc="drop",
        grad_hook=grad_hook,
        step_hook=step_hook,
        epoch_hook=lambda m, e, s: sp.epoch_record(test, m),
        state=state,
    )
    extra = {"rounds": rounds, "drop_in": drop_in, "revived": state["revived"], "round_starts": starts}
    return _finish("drop", model, sp, history, test, extra, training)
