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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimship.compress.checks import check_choice, check_int, check_number
from slimship.compress.device import mean_across_ranks
from slimship.compress.registry import CompressResult, register
from slimship.compress.sparsifier import (
    CRITERIA,
    Sparsifier,
    TargetOptions,
    check_parts,
    check_steps,
    register_sparsifier,
    space_fractions,
    stage_steps,
    steps_per_epoch,
    train_with,
)
from slimship.compress.training import Batch, Training, maybe_accuracy, working_copy
from slimship.errors import CompressionError

log = logging.getLogger(__name__)

__all__ = ["CRITERIA", "HESSO", "HSPG", "finish", "hesso", "hspg", "space_fractions"]


def check_projection(criterion: str, lam: float, epsilon: float) -> None:
    """HSPG's own options: a known criterion, lam and epsilon >= 0."""
    check_choice("criterion", criterion, CRITERIA)
    check_number("lam", lam)
    check_number("epsilon", epsilon)


@register_sparsifier("hspg")
class HSPG(Sparsifier):
    """Half-space projection of the least salient groups (chosen at the end of the warm-up) to zero."""

    state_keys = ("redundant", "lam", "before", "forced")

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        warmup_steps: int | None = None,
        projection_steps: int | None = None,
        lam: float = 1e-3,
        epsilon: float = 0.0,
        criterion: str = "salience",
        lr: float = 0.05,
        **options: Any,
    ) -> None:
        check_projection(criterion, lam, epsilon)
        check_number("lr", lr, low_open=True)
        check_steps(warmup_steps=warmup_steps, projection_steps=projection_steps)
        super().__init__(
            model,
            example_inputs,
            total_steps=total_steps,
            **options,  # the options every sparsifier takes: target, space_targets, spaces, seed
        )
        self.criterion = criterion
        self.start, self.end = stage_steps(total_steps, warmup_steps, projection_steps, "projection_steps")
        self.lam_base, self.epsilon, self.lr = lam, epsilon, lr
        self.shrink_steps = max(1, (self.end - self.start) // 2)
        self.redundant = torch.zeros_like(self.zero)
        self.lam = torch.zeros(len(self.groups), dtype=self.views.dtype, device=self.device)
        self.before: list[torch.Tensor] = []
        self.forced = 0
        #: python-side: some redundant group is not zero yet (once all are, the stage's steps cost nothing;
        #: a resumed run starts True and finds out after one step, which projects nothing)
        self.left = True

    def config(self) -> dict[str, Any]:
        stages = {"warmup_steps": self.start, "projection_steps": self.end - self.start}
        return {
            **super().config(),
            **stages,
            "lam": self.lam_base,
            "epsilon": self.epsilon,
            "criterion": self.criterion,
            "lr": self.lr,
        }

    def on_backward(self) -> None:
        if self.step == self.start and not bool(self.redundant.any()):
            self.choose()
        if self.start <= self.step < self.end and self.left:
            self.before = [b.matrix() for b in self.views]  # a new tensor (concatenated), not a view

    def choose(self) -> None:
        scores = self.scores(self.criterion)
        for space in self.spaces:
            self.redundant[self.least(scores, space, ~self.zero, self.quota[space])] = True
        norms = mean_across_ranks(self.views.norms())
        self.lam = torch.where(self.redundant, self.lam_base + norms / (self.lr * self.shrink_steps), 0.0)
        log.info("hspg: projection stage on %d redundant groups", int(self.redundant.sum()))

    def on_step(self) -> None:
        taken = self.step
        if self.start <= taken < self.end and self.before:
            self.left = self.project()
            self.before = []
            self.holding = True
        if taken == self.end - 1:
            left = self.redundant & ~self.zero
            self.forced = int(left.sum())
            self.zero |= left
            if self.forced:
                log.info("hspg: %d redundant groups projected to zero at the end of the stage", self.forced)

    def project(self) -> bool:
        """One group-lasso step on the redundant groups, then the half-space test: a group leaves when its
        trial point's margin ``trial . prev - epsilon ||prev||^2``, averaged across ranks, is negative (or
        its norm is zero), so every rank projects the same groups. True when a redundant group is left."""
        xs = [b.matrix() for b in self.views]  # this rank's values (its chunks under FSDP)
        each = iter(xs)
        sq = self.views.total(lambda b: next(each).pow(2).sum(1))  # squared norms, summed over shards
        trials: list[tuple[torch.Tensor, torch.Tensor]] = []

        def margin(block) -> torch.Tensor:
            prev, x = self.before[len(trials)], xs[len(trials)]
            norm = sq.index_select(0, block.rows).sqrt().to(x.dtype)[:, None]  # ([] is slower on CPU)
            lam = self.lam.index_select(0, block.rows)[:, None]
            trial = x - self.lr * lam.to(x.dtype) * x / norm.clamp_min(1e-30)
            trials.append((x, trial))
            return (trial * prev).sum(1) - self.epsilon * (prev * prev).sum(1)

        gap = torch.where(sq == 0, -math.inf, self.views.total(margin))
        live = self.redundant & ~self.zero
        out = live & (mean_across_ranks(gap) < 0)
        shrink = live & ~out
        for block, (x, trial) in zip(self.views, trials, strict=True):
            block.set_matrix(torch.where(shrink.index_select(0, block.rows)[:, None], trial, x))
        projected, left = torch.stack([out.any(), shrink.any()]).tolist()  # one host sync per step
        if projected:  # an unchanged mask keeps its version: the held-zero masks are not rebuilt
            self.zero |= out
        return left

    def decisions(self) -> dict[str, Any]:
        return {**super().decisions(), "redundant": self.redundant.nonzero().flatten().tolist()}


@register_sparsifier("hesso")
class HESSO(Sparsifier):
    """Per period, the least salient active groups of each space shrink geometrically to exactly zero."""

    state_keys = ("shrinking", "period")

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        target: float = 0.5,
        space_targets: dict[str, float] | None = None,
        spaces: list[str] | None = None,
        seed: int = 0,
        warmup_steps: int | None = None,
        pruning_steps: int | None = None,
        periods: int = 5,
    ) -> None:
        check_int("periods", periods, low=1)
        check_steps(warmup_steps=warmup_steps, pruning_steps=pruning_steps)
        super().__init__(
            model,
            example_inputs,
            total_steps=total_steps,
            target=target,
            space_targets=space_targets,
            spaces=spaces,
            seed=seed,
        )
        self.start, self.end = stage_steps(total_steps, warmup_steps, pruning_steps, "pruning_steps")
        self.periods = periods
        span = self.end - self.start
        check_parts("pruning_steps", span, periods, "periods")
        self.bounds = [self.start + round(p * span / periods) for p in range(periods + 1)]
        self.shrinking = torch.zeros_like(self.zero)
        self.period = -1

    def config(self) -> dict[str, Any]:
        stages = {"warmup_steps": self.start, "pruning_steps": self.end - self.start}
        return {**super().config(), **stages, "periods": self.periods}

    def on_backward(self) -> None:
        period = next(
            (p for p in range(self.periods) if self.bounds[p] <= self.step < self.bounds[p + 1]), None
        )
        if period is not None and period != self.period:
            self.period = period
            self.choose(period)  # the gradients of this step are the Taylor scores

    def choose(self, period: int) -> None:
        taken = self.zero | self.shrinking
        scores = self.scores("salience")
        for space, members in self.spaces.items():
            want = round(self.quota[space] * (period + 1) / self.periods)
            have = int(taken[members].sum())
            if want > have:
                self.shrinking[self.least(scores, space, ~taken, want - have)] = True

    def on_step(self) -> None:
        taken = self.step
        if not (self.start <= taken < self.end) or self.period < 0:
            return
        remaining = self.bounds[self.period + 1] - taken
        factor = (remaining - 1) / remaining
        self.views.scale(torch.where(self.shrinking, factor, 1.0))
        if remaining == 1:
            self.zero |= self.shrinking
            self.shrinking = torch.zeros_like(self.zero)
            self.holding = True

    def decisions(self) -> dict[str, Any]:
        return {**super().decisions(), "shrinking": self.shrinking.nonzero().flatten().tolist()}


def finish(
    sp: Sparsifier,
    model: nn.Module,
    history: list[dict[str, Any]],
    test: Iterable[Batch] | None,
    extra: dict[str, Any],
    training: Training,
) -> CompressResult:
    """The CompressResult of a zero-group sparsifier run by `compress`."""
    summary = sp.summary()
    info = {
        "target": sp.target,
        "group_sparsity": summary["group_sparsity"],
        "removable": summary["removable"],
        "groups": len(sp.groups),
        "per_space": sp.per_space(),
        "test_accuracy": maybe_accuracy(model, test),
        "completed": training.completed(history),
        **extra,
    }
    return CompressResult(model=model, method=sp.name, history=history, info=info)


def epoch_stages(
    training: Training, train: Iterable[Batch] | None, warmup: int | None, middle: int | None, what: str
) -> tuple[int, int, int]:
    """(steps per epoch, warm-up steps, middle-stage steps) from epoch counts (defaults 25% / 40%)."""
    check_steps(warmup_epochs=warmup, **{what: middle})
    n = steps_per_epoch(train)
    warmup = max(1, round(0.25 * training.epochs)) if warmup is None else warmup
    middle = max(1, round(0.4 * training.epochs)) if middle is None else middle
    if warmup < 0 or middle < 1 or warmup + middle > training.epochs:
        raise CompressionError(
            f"warmup_epochs={warmup} and {what}={middle} must fit in epochs={training.epochs} "
            f"(warmup >= 0, {what} >= 1)"
        )
    return n, warmup * n, middle * n


@dataclass(frozen=True)
class HspgOptions(TargetOptions):
    """The options of :func:`hspg` (see its documentation); ``hspg(..., options=HspgOptions(...))``."""

    target: float = 0.5
    space_targets: dict[str, float] | None = None
    spaces: list[str] | None = None
    warmup_epochs: int | None = None
    projection_epochs: int | None = None
    lam: float = 1e-3
    epsilon: float = 0.0
    criterion: str = "salience"

    def check(self) -> None:
        super().check()
        check_projection(self.criterion, self.lam, self.epsilon)


@register("hspg", training=Training(), options=HspgOptions)
def hspg(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    options: HspgOptions,
) -> CompressResult:
    """Half-space stochastic projected gradient towards a `target` group sparsity per space."""
    model = working_copy(model)
    n, warmup, middle = epoch_stages(
        training, train, options.warmup_epochs, options.projection_epochs, "projection_epochs"
    )
    sp = HSPG(
        model,
        example_inputs,
        total_steps=training.epochs * n,
        target=options.target,
        space_targets=options.space_targets,
        spaces=options.spaces,
        seed=training.seed,
        warmup_steps=warmup,
        projection_steps=middle,
        lam=options.lam,
        epsilon=options.epsilon,
        criterion=options.criterion,
        lr=training.lr,
    )
    history = train_with(sp, model, train, test, training)
    extra = {
        "forced_to_zero": sp.forced,
        "lam": options.lam,
        "epsilon": options.epsilon,
        "stages": [sp.start, sp.end],
    }
    return finish(sp, model, history, test, extra, training)


@dataclass(frozen=True)
class HessoOptions(TargetOptions):
    """The options of :func:`hesso` (see its documentation); ``hesso(..., options=HessoOptions(...))``."""

    target: float = 0.5
    space_targets: dict[str, float] | None = None
    spaces: list[str] | None = None
    warmup_epochs: int | None = None
    pruning_epochs: int | None = None
    periods: int = 5

    def check(self) -> None:
        super().check()
        check_int("periods", self.periods, low=1)


@register("hesso", training=Training(), options=HessoOptions)
def hesso(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    options: HessoOptions,
) -> CompressResult:
    """Saliency-ranked groups shrunk progressively to exactly zero until each space reaches `target`."""
    model = working_copy(model)
    n, warmup, middle = epoch_stages(
        training, train, options.warmup_epochs, options.pruning_epochs, "pruning_epochs"
    )
    check_parts(f"pruning_epochs={middle // max(n, 1)} x {n} batches", middle, options.periods, "periods")
    sp = HESSO(
        model,
        example_inputs,
        total_steps=training.epochs * n,
        target=options.target,
        space_targets=options.space_targets,
        spaces=options.spaces,
        seed=training.seed,
        warmup_steps=warmup,
        pruning_steps=middle,
        periods=options.periods,
    )
    history = train_with(sp, model, train, test, training)
    return finish(
        sp, model, history, test, {"periods": options.periods, "stages": [sp.start, sp.end]}, training
    )
