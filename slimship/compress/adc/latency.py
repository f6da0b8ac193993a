"""ADC's latency side: a per-space latency table measured on the target runtime, and the loop that
checks a policy on the measured latency of the slimmed model and tightens (or fills) it until it fits.

Measurements happen on rank 0 and are broadcast, so every rank of a torchrun job sees the same numbers.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.compress.adc.budget import Budget, Snap, Space, grow_to_budget, shrink_to_budget
from slimship.compress.adc.policy import Pruner
from slimship.compress.device import broadcast_from_rank0, device_of, rank, score_dtype
from slimship.compress.training import progress
from slimship.errors import CompressionError
from slimship.exporters.registry import ExportRequest, format_for_runtime
from slimship.runtimes.measure import median_latencies_ms
from slimship.runtimes.registry import RUNTIME_NAMES
from slimship.runtimes.targets import Target
from slimship.slimming.api import slim
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_NAMES  # the registry's runtimes (slimship.runtimes.registry)


@dataclass
class LatencyTable:
    """Per-space measured latency at a few kept fractions; a candidate's latency is additive over spaces."""

    runtime: str
    threads: int
    dense_ms: float
    min_ms: float  # every space at its minimum (measured)
    points: dict[str, list[tuple[float, float]]]  # space -> [(kept fraction, ms)] ascending

    def delta(self, space: str, fraction: float) -> float:
        pts = self.points[space]
        xs = [p[0] for p in pts] + [1.0]
        ys = [p[1] for p in pts] + [self.dense_ms]
        return float(np.interp(fraction, xs, ys)) - self.dense_ms

    def latency(self, names: Sequence[str], fractions: Sequence[float]) -> float:
        additive = self.dense_ms + sum(self.delta(s, f) for s, f in zip(names, fractions, strict=True))
        return max(additive, self.min_ms)  # never below the measured latency with every space at minimum


# ---- latency measurement ---------------------------------------------------------------------------
def measure_latency_ms(
    model: nn.Module,
    inputs: Any,
    runtime: str = "onnxruntime",
    threads: int = 1,
    runs: int = 60,
    repeats: int = 1,
) -> float:
    """Latency (ms) of `model` exported for `runtime` (the registry's fp32 format it opens, parity checked
    by the exporter) and timed by `slimship.runtimes` in a runner process with `threads` threads.

    The median of `runs` timed runs; with `repeats` > 1, the smallest of that many such medians (load
    from other processes only ever adds time, so the minimum is the robust estimate on a shared machine).
    """
    if runtime not in RUNTIMES:
        raise CompressionError(f"option 'target_runtime' must be one of {RUNTIMES}, got {runtime!r}")
    inputs = as_input_tuple(inputs)
    record = format_for_runtime(runtime)
    target = Target(f"adc-{runtime}-{threads}t", threads=threads, runtime=runtime)
    with tempfile.TemporaryDirectory(prefix="slimship-adc-") as tmp:
        path = Path(tmp) / record.file_name("candidate")
        record.export(ExportRequest(model.eval(), inputs, inputs, dynamic_batch=False), path)
        arrays = [t.detach().numpy() for t in inputs]
        return median_latencies_ms([path], arrays, target, warmup=10, runs=runs, repeats=repeats)[0]


def slim_latency(
    pruner: Pruner, counts: list[int], inputs, runtime: str, threads: int, runs: int, repeats: int = 1
) -> float:
    """Latency (ms) of the model slimmed at `counts`, measured on rank 0 and broadcast to every rank."""
    pruner.apply(counts)
    device = device_of(pruner.model)
    value = torch.zeros(1, dtype=score_dtype(device), device=device)
    if rank() == 0:
        slimmed = slim(pruner.model, inputs).model
        value += measure_latency_ms(slimmed, inputs, runtime, threads, runs, repeats)
    return float(broadcast_from_rank0(value)[0])


def build_latency_table(
    pruner: Pruner,
    spaces: list[Space],
    inputs: tuple[Any, ...],
    runtime: str,
    threads: int,
    fractions: Sequence[float],
    runs: int,
    min_ms: float,
) -> LatencyTable:
    """Measure the dense model and each space alone at each kept fraction (`min_ms`: all at minimum)."""
    full = [s.n for s in spaces]
    dense_ms = slim_latency(pruner, full, inputs, runtime, threads, runs)
    log.info("adc latency table on %s: dense %.4f ms, all at minimum %.4f ms", runtime, dense_ms, min_ms)
    points: dict[str, list[tuple[float, float]]] = {}
    with progress("adc latency table", len(spaces)) as advance:
        for t, s in enumerate(spaces):
            pts = []
            for f in sorted(set(fractions)):
                c = max(1, round(f * s.n))
                if c >= s.n:
                    continue
                counts = list(full)
                counts[t] = c
                pts.append((c / s.n, slim_latency(pruner, counts, inputs, runtime, threads, runs)))
            points[s.name] = pts
            advance()
    pruner.apply(full)
    return LatencyTable(runtime, threads, dense_ms, min_ms, points)


def close_latency_loop(
    budget: Budget,
    counts: list[int],
    measure: Callable[[list[int]], float],
    margin: float = 0.05,
    rounds: int = 6,
    what: str = "latency budget",
    where: str = "the target",
    caps: list[int] | None = None,
    snap: Snap = list,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Measure `counts` on the target; while over ``(1 - margin) x budget.limit``, tighten and re-measure.

    With `caps` (the largest count per space), a policy measured more than `margin` under that goal is
    then grown towards it the same way (model rescaled at the policy, every kept fraction scaled up by
    one common factor), while the rounds last and the growth stays within the goal: the budget is used,
    not left idle. The largest policy measured within the goal is chosen. `snap` maps every policy to
    one the target runs well (e.g. channel counts aligned to the multiple its kernels favour).

    Each round rescales the latency model at the current policy by measured/predicted (the table limit
    becomes ``min(limit, predicted) * goal / measured``) and shrinks every kept fraction by one common
    factor until the model predicts the new limit. Returns the first policy measured within the goal
    (else the fastest one within the budget) and every check in order (counts, predicted and measured
    ms, chosen). Raises CompressionError naming `where` when no measured policy meets the budget after
    `rounds` measurements or at every space's minimum.
    """
    limit = budget.limit
    goal = limit * (1 - margin)
    checks: list[dict[str, Any]] = []
    counts = snap(list(counts))
    try:
        for _ in range(rounds):
            predicted = budget.cost(budget.fractions(counts))
            measured = measure(counts)
            checks.append({"counts": list(counts), "predicted_ms": predicted, "measured_ms": measured})
            log.info(
                "adc latency check on %s: predicted %.4f ms, measured %.4f ms", where, predicted, measured
            )
            if measured <= goal or counts == budget.min_counts:
                break
            # rescale the latency model at this policy by measured / predicted
            budget.limit = min(budget.limit, predicted) * goal / measured
            counts = shrink_to_budget(counts, budget, snap)
        while caps is not None and len(checks) < rounds:
            last = checks[-1]
            if not last["measured_ms"] < goal * (1 - margin):
                break
            budget.limit = last["predicted_ms"] * goal / last["measured_ms"]
            bigger = grow_to_budget(last["counts"], budget, caps, snap)
            if bigger == last["counts"]:
                break
            predicted, measured = budget.cost(budget.fractions(bigger)), measure(bigger)
            checks.append({"counts": list(bigger), "predicted_ms": predicted, "measured_ms": measured})
            log.info(
                "adc latency fill on %s: predicted %.4f ms, measured %.4f ms", where, predicted, measured
            )
            if measured > goal:
                break
    finally:
        budget.limit = limit
    within = [c for c in checks if c["measured_ms"] <= limit]
    if not within:
        last = checks[-1]
        floor = " with every space at min_keep" if last["counts"] == budget.min_counts else ""
        raise CompressionError(
            f"{what} on {where} was not met after {len(checks)} measured round(s): the last policy measured "
            f"{last['measured_ms']:.4f} ms (predicted {last['predicted_ms']:.4f} ms) against {limit:.4f} ms"
            f"{floor}; raise the budget, lower min_keep or raise latency_rounds"
        )
    in_goal = [c for c in within if c["measured_ms"] <= goal]
    chosen = (
        max(in_goal, key=lambda c: sum(c["counts"]))
        if in_goal
        else min(within, key=lambda c: c["measured_ms"])
    )
    for c in checks:
        c["chosen"] = c is chosen
    return list(chosen["counts"]), checks
