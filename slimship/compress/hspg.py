"""Group sparsification in the Only-Train-Once family: HSPG and HESSO.

Both train on the channel groups the slimming engine finds and end with whole groups exactly zero,
so ``slim`` removes them physically.

* ``hspg`` (Half-Space Stochastic Projected Gradient): plain SGD for a warm-up stage, then for the
  redundant groups (the ``target`` fraction of each space least salient at the end of the warm-up, as in
  OTOv2's saliency-guided partition; ``criterion="magnitude"`` ranks by norm alone) a group-lasso step
  ``x - lr * lam_g * x / ||x||`` after every SGD step, followed by the half-space test: a group whose
  trial point leaves the half-space ``{z : z . x >= epsilon * ||x||^2}`` of its previous iterate is
  projected to exactly zero. ``lam_g = lam + ||x_g|| / (lr * shrink_steps)`` so the regulariser can
  reach the origin within the projection stage whatever the scale of the weights; groups still non-zero
  at the end of that stage are projected (counted in ``info["forced_to_zero"]``). A fine-tuning stage
  with the zero groups held at zero ends the run.
* ``hesso`` (the later, hyper-parameter-light variant): after a warm-up, the pruning stage is cut into
  ``periods``; at the start of each, the least salient active groups of every space (rank average of
  normalised magnitude and first-order Taylor score) join the redundant set until the space reaches
  ``target``; during the period each new redundant group is shrunk geometrically to exactly zero at the
  period's end while the rest trains. Then fine-tuning with zeros held.
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
    GroupTensors,
    Training,
    check_choice,
    check_fraction,
    maybe_accuracy,
    prunable_groups,
    register,
    working_copy,
)
from slimship.errors import CompressionError

log = logging.getLogger(__name__)


def space_fractions(
    by_space: dict[str, list[int]], target: float, space_targets: dict[str, float] | None
) -> dict[str, float]:
    """Fraction of each space's groups to remove: `target`, or the space's entry in `space_targets`."""
    overrides = dict(space_targets or {})
    unknown = sorted(set(overrides) - set(by_space))
    if unknown:
        raise CompressionError(
            f"space_targets names {unknown}, which are not prunable spaces here; known: {sorted(by_space)}"
        )
    return {s: check_fraction(f"space_targets[{s!r}]", overrides.get(s, target)) for s in by_space}


def _rank(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda k: values[k])
    ranks = [0.0] * len(values)
    for r, k in enumerate(order):
        ranks[k] = r / max(len(values) - 1, 1)
    return ranks


#: how groups are ranked for removal (see GroupSparsifier.least_salient)
CRITERIA = ("salience", "magnitude")


class GroupSparsifier:
    """Shared bookkeeping: prunable groups per space, per-space quotas, held-zero groups."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        target: float,
        spaces: list[str] | None,
        space_targets: dict[str, float] | None = None,
    ) -> None:
        self.target = check_fraction("target", target)
        found, by_space = prunable_groups(model, example_inputs, spaces)
        fractions = space_fractions(by_space, self.target, space_targets)
        order = [i for idx in by_space.values() for i in idx]
        self.tensors = GroupTensors(model, [found.groups[i] for i in order])
        self.space_of: list[str] = [found.groups[i].space for i in order]
        self.spaces: dict[str, list[int]] = {}
        for local, space in enumerate(self.space_of):
            self.spaces.setdefault(space, []).append(local)
        self.quota = {s: min(round(fractions[s] * len(m)), len(m) - 1) for s, m in self.spaces.items()}
        self.sizes = self.tensors.sizes()

    def zero_list(self, state: dict[str, Any]) -> list[int]:
        return state.setdefault("zero", [])

    def hold_zero_grads(self, state: dict[str, Any]) -> None:
        for i in self.zero_list(state):
            self.tensors.zero_grad(i)

    def hold_zeros(self, state: dict[str, Any]) -> None:
        for i in self.zero_list(state):
            self.tensors.zero(i)

    def sparsity(self) -> float:
        return sum(self.tensors.is_zero(i) for i in range(len(self.tensors))) / max(len(self.tensors), 1)

    def per_space(self) -> dict[str, list[int]]:
        """space -> [zero groups, total groups]."""
        return {s: [sum(self.tensors.is_zero(i) for i in m), len(m)] for s, m in self.spaces.items()}

    def magnitude(self, i: int) -> float:
        return self.tensors.norm(i) / math.sqrt(max(self.sizes[i], 1))

    def taylor(self, i: int) -> float:
        return float((self.tensors.vector(i) * self.tensors.vector(i, grad=True)).sum().abs())

    def least_salient(self, members: list[int], criterion: str = "salience") -> list[int]:
        """`members` from least to most important: by ``magnitude``, or ``salience`` (the rank average
        of normalised magnitude and first-order Taylor score; needs the gradients of a step)."""
        if criterion == "magnitude":
            return sorted(members, key=lambda i: (self.magnitude(i), i))
        check_choice("criterion", criterion, CRITERIA)
        magnitude = _rank([self.magnitude(i) for i in members])
        taylor = _rank([self.taylor(i) for i in members])
        return [i for _, i in sorted(zip((a + b for a, b in zip(magnitude, taylor)), members))]

    def epoch_record(self, test: Iterable[Batch] | None, model: nn.Module) -> dict[str, Any]:
        record: dict[str, Any] = {"group_sparsity": self.sparsity()}
        acc = maybe_accuracy(model, test)
        if acc is not None:
            record["test_accuracy"] = acc
        return record


def _stage_steps(epochs: int, warmup: int | None, middle: int | None, steps_per_epoch: int, what: str):
    warmup = max(1, round(0.25 * epochs)) if warmup is None else warmup
    middle = max(1, round(0.4 * epochs)) if middle is None else middle
    if warmup < 0 or middle < 1 or warmup + middle > epochs:
        raise CompressionError(
            f"warmup_epochs={warmup} and {what}={middle} must fit in epochs={epochs} "
            f"(warmup >= 0, {what} >= 1)"
        )
    return warmup * steps_per_epoch, (warmup + middle) * steps_per_epoch


def _steps_per_epoch(train: Iterable[Batch] | None) -> int:
    if train is None:
        raise CompressionError("this method trains: pass training batches (train=...)")
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in train)


def _finish(
    method: str,
    model: nn.Module,
    sparsifier: GroupSparsifier,
    history: list[dict[str, Any]],
    test: Iterable[Batch] | None,
    extra: dict[str, Any],
    training: Training,
) -> CompressResult:
    info = {
        "target": sparsifier.target,
        "group_sparsity": sparsifier.sparsity(),
        "groups": len(sparsifier.tensors),
        "per_space": sparsifier.per_space(),
        "test_accuracy": maybe_accuracy(model, test),
        "completed": training.completed(history),
        **extra,
    }
    return CompressResult(model=model, method=method, history=history, info=info)


@register("hspg", training=Training())
def hspg(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    target: float = 0.5,
    space_targets: dict[str, float] | None = None,
    spaces: list[str] | None = None,
    warmup_epochs: int | None = None,
    projection_epochs: int | None = None,
    lam: float = 1e-3,
    epsilon: float = 0.0,
    criterion: str = "salience",
) -> CompressResult:
    """Half-space stochastic projected gradient towards a `target` group sparsity per space."""
    if epsilon < 0 or lam < 0:
        raise CompressionError(f"lam and epsilon must be >= 0, got lam={lam}, epsilon={epsilon}")
    check_choice("criterion", criterion, CRITERIA)
    model = working_copy(model)
    sp = GroupSparsifier(model, example_inputs, target, spaces, space_targets)
    n = _steps_per_epoch(train)
    start, end = _stage_steps(training.epochs, warmup_epochs, projection_epochs, n, "projection_epochs")
    lr = training.lr  # the base rate sizes the group-lasso steps
    shrink_steps = max(1, (end - start) // 2)
    state: dict[str, Any] = {"zero": [], "redundant": [], "lam": [], "forced": 0}
    before: dict[int, torch.Tensor] = {}

    def choose_redundant() -> None:
        for space, members in sp.spaces.items():
            state["redundant"] += sp.least_salient(members, criterion)[: sp.quota[space]]
        state["lam"] = [lam + sp.tensors.norm(i) / (lr * shrink_steps) for i in state["redundant"]]
        log.info("hspg: projection stage on %d redundant groups", len(state["redundant"]))

    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        sp.hold_zero_grads(state)
        if start <= step < end:
            zero = set(state["zero"])
            for i in state["redundant"]:
                if i not in zero:
                    before[i] = sp.tensors.vector(i).clone()

    @torch.no_grad()
    def step_hook(m: nn.Module, epoch: int, step: int) -> None:
        # `step` counts completed steps: the one just taken is step - 1
        taken = step - 1
        if taken == start and not state["redundant"]:
            choose_redundant()
            for i in state["redundant"]:
                before[i] = sp.tensors.vector(i).clone()
        if start <= taken < end:
            zero = set(state["zero"])
            for i, lam_g in zip(state["redundant"], state["lam"], strict=True):
                if i in zero or i not in before:
                    continue
                x = sp.tensors.vector(i)
                norm = float(x.norm())
                trial = x - lr * lam_g * x / norm if norm > 0 else x
                prev = before[i]
                if float(trial @ prev) < epsilon * float(prev @ prev) or norm == 0:
                    state["zero"].append(i)
                    sp.tensors.zero(i)
                else:
                    sp.tensors.set_vector(i, trial)
            before.clear()
        if taken == end - 1:
            left = [i for i in state["redundant"] if i not in set(state["zero"])]
            state["forced"] = len(left)
            state["zero"] += left
            if left:
                log.info("hspg: %d redundant groups projected to zero at the end of the stage", len(left))
        sp.hold_zeros(state)

    history = training.run(
        model,
        train,
        desc="hspg",
        grad_hook=grad_hook,
        step_hook=step_hook,
        epoch_hook=lambda m, e, s: sp.epoch_record(test, m),
        state=state,
    )
    extra = {"forced_to_zero": state["forced"], "lam": lam, "epsilon": epsilon, "stages": [start, end]}
    return _finish("hspg", model, sp, history, test, extra, training)


@register("hesso", training=Training())
def hesso(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    target: float = 0.5,
    space_targets: dict[str, float] | None = None,
    spaces: list[str] | None = None,
    warmup_epochs: int | None = None,
    pruning_epochs: int | None = None,
    periods: int = 5,
) -> CompressResult:
    """Saliency-ranked groups shrunk progressively to exactly zero until each space reaches `target`."""
    if periods < 1:
        raise CompressionError(f"periods must be >= 1, got {periods}")
    model = working_copy(model)
    sp = GroupSparsifier(model, example_inputs, target, spaces, space_targets)
    n = _steps_per_epoch(train)
    start, end = _stage_steps(training.epochs, warmup_epochs, pruning_epochs, n, "pruning_epochs")
    bounds = [start + round(p * (end - start) / periods) for p in range(periods + 1)]
    state: dict[str, Any] = {"zero": [], "shrinking": [], "period": -1}

    def choose(period: int) -> None:
        taken = set(state["zero"]) | set(state["shrinking"])
        for space, members in sp.spaces.items():
            want = round(sp.quota[space] * (period + 1) / periods)
            have = sum(1 for i in members if i in taken)
            active = [i for i in members if i not in taken]
            if want <= have or not active:
                continue
            state["shrinking"] += sp.least_salient(active)[: want - have]

    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        sp.hold_zero_grads(state)
        period = next((p for p in range(periods) if bounds[p] <= step < bounds[p + 1]), None)
        if period is not None and period != state["period"]:
            state["period"] = period
            choose(period)  # the gradients of this step are the Taylor scores

    @torch.no_grad()
    def step_hook(m: nn.Module, epoch: int, step: int) -> None:
        taken = step - 1
        if start <= taken < end and state["shrinking"]:
            p = state["period"]
            remaining = bounds[p + 1] - taken
            for i in state["shrinking"]:
                sp.tensors.scale(i, (remaining - 1) / remaining)
            if remaining == 1:
                state["zero"] += state["shrinking"]
                state["shrinking"] = []
        sp.hold_zeros(state)

    history = training.run(
        model,
        train,
        desc="hesso",
        grad_hook=grad_hook,
        step_hook=step_hook,
        epoch_hook=lambda m, e, s: sp.epoch_record(test, m),
        state=state,
    )
    extra = {"periods": periods, "stages": [start, end]}
    return _finish("hesso", model, sp, history, test, extra, training)
