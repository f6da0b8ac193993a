"""The registered ``adc`` method: ``compress("adc", ...)`` on training batches.

It holds back a validation split, runs the same search as :func:`~slimship.compress.adc.adc_search`
with an `evaluate` that scores accuracy on that split, picks among the best policies after a short
fine-tune, closes the loop on measured latency for a latency budget, and fine-tunes the winner.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimship.compress.adc.agent import DDPG
from slimship.compress.adc.budget import Budget, aligned_counts
from slimship.compress.adc.latency import LatencyTable, build_latency_table, close_latency_loop, slim_latency
from slimship.compress.adc.policy import recalibrate_batchnorm
from slimship.compress.adc.search import (
    SEARCHES,
    Scorer,
    Setup,
    check_keep,
    flops_budget,
    prepare,
    search_policies,
    select_policy,
    top_policies,
)
from slimship.compress.checks import check_choice
from slimship.compress.device import device_of
from slimship.compress.groups import GroupTensors
from slimship.compress.registry import CompressResult, register
from slimship.compress.training import (
    Batch,
    LoopOptions,
    make_optimizer,
    maybe_accuracy,
    train_loop,
    working_copy,
)
from slimship.errors import CompressionError
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)


# ---- data ------------------------------------------------------------------------------------------
def split_validation(train: Iterable[Batch], fraction: float, seed: int) -> tuple[list[Batch], list[Batch]]:
    """Hold back `fraction` of one pass over `train` (deterministic under `seed`): (rest, validation)."""
    if hasattr(train, "set_epoch"):
        train.set_epoch(0)
    xs, ys = zip(*list(train), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(x)))
    val, rest = order[:n_val], order[n_val:]
    return [(x[rest], y[rest])], [(x[val], y[val])]


@torch.no_grad()
def validation_scores(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `batches`."""
    model.eval()
    correct = loss = count = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        count += len(y)
    return {"val_accuracy": 100.0 * correct / max(count, 1), "val_loss": loss / max(count, 1)}


def training_batches(rest: list[Batch], batch_size: int, seed: int) -> Any:
    """The training part (validation held back) as shuffled mini-batches."""
    from slimship.data import Batches

    x = torch.cat([b[0] for b in rest]).numpy()
    y = torch.cat([b[1] for b in rest]).numpy()
    return Batches(x, y, batch_size, shuffle=True, seed=seed)


def finetune(model, tensors: GroupTensors, removed: list[int], train, epochs: int, lr: float, seed: int):
    if epochs <= 0:
        return []

    def keep_zero(m: nn.Module, epoch: int, step: int) -> None:
        for i in removed:
            tensors.zero(i)

    history = train_loop(
        model,
        train,
        LoopOptions(epochs=epochs, seed=seed),
        optimizer=make_optimizer(model, lr),
        step_hook=keep_zero,
        desc="adc fine-tune",
    )
    keep_zero(model, 0, 0)
    return history


#: the FLOPs budget when neither target is given: keep a quarter of the dense FLOPs
DEFAULT_FLOPS_KEPT = 0.25


@dataclass(frozen=True)
class AdcOptions:
    """The options of :func:`adc` (see its documentation); ``adc(..., options=AdcOptions(...))``."""

    target_flops_kept: float | None = None
    target_latency_ms: float | None = None
    target_runtime: str = "onnxruntime"
    target_threads: int = 1
    latency_fractions: Sequence[float] = (0.25, 0.5, 0.75)
    latency_runs: int = 60
    search: str = "ddpg"
    episodes: int = 200
    warmup_episodes: int = DDPG.warmup_episodes
    min_keep: float = 0.1
    max_keep: float = 1.0
    importance: str = "magnitude"
    recalibrate_bn: int = 4
    seed_uniform: bool = True
    top_k: int = 4
    select_epochs: int = 1
    latency_margin: float = 0.05
    latency_rounds: int = 6
    latency_repeats: int = 3
    latency_fill: bool = True
    latency_multiple: int | None = None
    val_fraction: float = 0.2
    sigma: float = DDPG.sigma
    sigma_decay: float = DDPG.sigma_decay
    hidden: int = DDPG.hidden
    lr_actor: float = DDPG.lr_actor
    lr_critic: float = DDPG.lr_critic
    tau: float = DDPG.tau
    gamma: float = DDPG.gamma
    batch_size: int = DDPG.batch_size
    updates_per_step: int = DDPG.updates_per_step
    buffer_size: int = DDPG.buffer_size
    finetune_epochs: int = 5
    lr: float = 0.01
    checkpoint: str | Path | None = None
    seed: int = 0

    def check(self) -> None:
        """The option rules (checked at config check and when adc runs)."""
        check_choice("search", self.search, SEARCHES)
        check_keep(self.min_keep, self.max_keep)
        if self.target_flops_kept is not None and self.target_latency_ms is not None:
            raise CompressionError(
                f"give one of target_flops_kept ({self.target_flops_kept}) and target_latency_ms "
                f"({self.target_latency_ms}), not both: the search has one budget"
            )
        if (
            self.top_k < 1
            or self.select_epochs < 0
            or self.latency_rounds < 1
            or not 0 <= self.latency_margin < 1
        ):
            raise CompressionError(
                "options need top_k >= 1, select_epochs >= 0, latency_rounds >= 1 and "
                f"0 <= latency_margin < 1, got {self.top_k}, {self.select_epochs}, {self.latency_rounds}, "
                f"{self.latency_margin}"
            )


@register("adc", options=AdcOptions)
def adc(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    options: AdcOptions,
) -> CompressResult:
    """Search per-space keep ratios with DDPG under a FLOPs (or latency) budget, prune, fine-tune.

    Selection: the `top_k` distinct policies of highest search reward (the uniform policy among them when
    `seed_uniform`) are each fine-tuned for `select_epochs` on the training part and scored on the
    validation split; the best one wins (``select_epochs=0``: the highest reward wins). Latency budget:
    the chosen policy is slimmed and measured on the target; while it is over ``(1 - latency_margin) x``
    the budget, the latency model is rescaled by measured/predicted and the policy shrunk, for at most
    `latency_rounds` measurements (each the smallest of `latency_repeats` medians), after which a
    CompressionError names the target. With `latency_fill`, a policy measured well under the goal is grown
    towards it in the remaining rounds (the largest policy measured within the goal is kept). With
    `latency_multiple`, every policy the loop measures keeps multiples of it per space (the channel multiple
    the target's kernels favour, see ``slimship.runtimes.measure_alignment``): unaligned counts can fall
    off a runtime's fast kernels, which no per-space latency table predicts.
    """
    target_flops_kept = options.target_flops_kept
    if train is None:
        raise CompressionError(
            "adc needs training data (train batches) for its validation split and fine-tuning"
        )
    if options.target_latency_ms is None and target_flops_kept is None:
        target_flops_kept = DEFAULT_FLOPS_KEPT
    inputs = as_input_tuple(example_inputs)
    model = working_copy(model).eval()
    rest, val = split_validation(train, options.val_fraction, options.seed)
    setup = prepare(model, inputs, options.importance, rest[:1])
    pruner, spaces, flops = setup.pruner, setup.spaces, setup.flops
    info: dict[str, Any] = {"spaces": setup.names, "importance": options.importance, "search": options.search}
    timing = Timing(
        options.target_runtime, options.target_threads, options.latency_runs, options.latency_repeats
    )
    if options.target_latency_ms is not None:
        budget, table = latency_budget(
            setup, inputs, timing, options.target_latency_ms, options.min_keep, options.latency_fractions
        )
        info["latency_table"] = table
        info["budget"] = {
            "kind": "latency_ms",
            "target": options.target_latency_ms,
            "runtime": options.target_runtime,
        }
    else:
        budget = flops_budget(setup, target_flops_kept, options.min_keep)
        info["budget"] = {"kind": "flops_kept", "target": target_flops_kept}

    calib = [
        (x[i : i + 64], y[i : i + 64]) for x, y in rest for i in range(0, 64 * options.recalibrate_bn, 64)
    ]
    device = device_of(model)

    def evaluate(m: nn.Module) -> float:
        return float(maybe_accuracy(m, [(x.to(device), y) for x, y in val])) / 100.0

    score = Scorer(pruner, evaluate, calib)
    ddpg = DDPG(
        warmup_episodes=options.warmup_episodes,
        sigma=options.sigma,
        sigma_decay=options.sigma_decay,
        hidden=options.hidden,
        lr_actor=options.lr_actor,
        lr_critic=options.lr_critic,
        tau=options.tau,
        gamma=options.gamma,
        batch_size=options.batch_size,
        updates_per_step=options.updates_per_step,
        buffer_size=options.buffer_size,
    )
    state, incumbent = search_policies(
        setup,
        budget,
        score,
        search=options.search,
        episodes=options.episodes,
        ddpg=ddpg,
        keep=(options.min_keep, options.max_keep),
        seed_uniform=options.seed_uniform,
        checkpoint=options.checkpoint,
        seed=options.seed,
    )
    candidates = top_policies(state.curve, incumbent, options.top_k)
    counts, selection = candidates[0]["counts"], []
    if options.select_epochs > 0 and len(candidates) > 1:
        tune = training_batches(rest, getattr(train, "batch_size", 64), options.seed)

        def select_score(c: list[int]) -> dict[str, float]:
            removed = pruner.apply(c)
            recalibrate_batchnorm(model, calib, pruner.tensors, removed)
            finetune(model, pruner.tensors, removed, tune, options.select_epochs, options.lr, options.seed)
            return validation_scores(model, val)

        counts, selection = select_policy(candidates, select_score)
    info["selection"] = selection
    if options.target_latency_ms is not None:
        caps = [max(1, math.floor(options.max_keep * s.n)) for s in spaces] if options.latency_fill else None
        o = options
        counts, checks = check_latency(setup, inputs, timing, budget, counts, o.target_latency_ms, caps,
                                       o.latency_margin, o.latency_rounds, o.latency_multiple)  # fmt: skip
        chosen = next(c for c in checks if c["chosen"])
        info.update(latency_checks=checks, predicted_latency_ms=chosen["predicted_ms"])
        info["measured_latency_ms"] = chosen["measured_ms"]
    info["search_val_accuracy"] = 100.0 * score(counts, "the chosen policy")  # leaves it applied
    removed = pruner.pruned(counts)
    history = finetune(
        model, pruner.tensors, removed, train, options.finetune_epochs, options.lr, options.seed
    )
    fr = budget.fractions(counts)
    info.update(
        policy={s.name: f for s, f in zip(spaces, fr, strict=True)},
        kept_channels={s.name: [c, s.n] for s, c in zip(spaces, counts, strict=True)},
        reward_curve=[e["reward"] for e in state.curve],
        best_reward=state.best_reward,
        uniform_reward=None if incumbent is None else incumbent[1],
        episodes=state.curve,
        flops_kept_predicted=flops.flops(fr) / flops.total,
        predicted_cost=budget.cost(fr),
        test_accuracy=maybe_accuracy(model, test),
    )
    return CompressResult(model=model, method="adc", history=history, info=info)


@dataclass(frozen=True)
class Timing:
    """Where and how latency is measured: runtime, threads, timed runs, repeats of the final checks."""

    runtime: str
    threads: int
    runs: int
    repeats: int

    @property
    def where(self) -> str:
        return f"target runtime {self.runtime!r} ({self.threads} thread(s))"


def latency_budget(
    setup: Setup,
    inputs: tuple[Any, ...],
    timing: Timing,
    target_ms: float,
    min_keep: float,
    fractions: Sequence[float],
) -> tuple[Budget, LatencyTable]:
    """A latency budget priced by a table measured on the target (CompressionError if out of reach)."""
    minimum = [max(1, round(min_keep * s.n)) for s in setup.spaces]
    min_ms = slim_latency(setup.pruner, minimum, inputs, timing.runtime, timing.threads, timing.runs)
    if min_ms > target_ms:
        raise CompressionError(
            f"latency budget target_latency_ms={target_ms} on {timing.where} cannot be reached: the best "
            f"achievable latency, every space at min_keep={min_keep}, is {min_ms:.4f} ms; "
            "raise the budget or lower min_keep"
        )
    table = build_latency_table(setup.pruner, setup.spaces, inputs, timing.runtime, timing.threads,
                                (min_keep, *fractions), timing.runs, min_ms)  # fmt: skip
    names = setup.names
    return Budget(setup.spaces, lambda fr: table.latency(names, fr), target_ms, min_keep), table


def check_latency(
    setup: Setup,
    inputs: tuple[Any, ...],
    timing: Timing,
    budget: Budget,
    counts: list[int],
    target_ms: float,
    caps: list[int] | None,
    margin: float,
    rounds: int,
    multiple: int | None,
) -> tuple[list[int], list[dict[str, Any]]]:
    """:func:`close_latency_loop` on the slimmed model's latency measured on the target."""

    def measure(c: list[int]) -> float:
        return slim_latency(
            setup.pruner, c, inputs, timing.runtime, timing.threads, timing.runs, timing.repeats
        )

    snap = (lambda c: aligned_counts(c, setup.spaces, multiple)) if multiple else list
    what = f"target_latency_ms={target_ms}"
    return close_latency_loop(budget, counts, measure, margin, rounds, what, timing.where, caps, snap)
