"""The one speedup figure: its definition, its record and how every table says it.

A speedup is the median of per-pair dense/slim latency ratios over interleaved pairs (dense, slim, dense,
slim ...) run in one process on the target, with the p10-p90 of those ratios (`SPEEDUP_DEFINITION`). The
p50s shown beside it are those of the same pairs.

Why a headline and the p50 ratio of the same pairs can disagree (1.94x against 48.3 -> 41.3 ms = 1.17x):
when other processes share the pinned core, each run either finishes undisturbed or carries a whole
time slice of theirs, so the timings are bimodal. Each model's median then sits in whichever mode holds
half of its runs, and the median of the pair ratios mixes the modes: the figures land anywhere. On one
thread the runner also records each run's CPU time on its own thread; a run whose wall time exceeds it
by more than LOST_TIME lost time to other processes. A speedup is `disturbed` when its p50 ratio and its
median are more than DISTURBED_GAP apart or more than DISTURBED_SHARE of its pairs lost time; its text
then says so, with the p50 ratio and the CPU-time ratio of the same pairs (a different figure: what the
kernels cost, without the waits), and asks for a rerun on an idle core.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPEEDUP_DEFINITION = (
    "speedup: the median of per-pair dense/slim latency ratios over interleaved pairs (dense, slim, dense, "
    "slim ...) run in one process on the target, with the p10-p90 of those ratios in brackets; the p50s "
    "beside it are those of the same pairs; efficiency: speedup / FLOPs ratio (dense FLOPs / slim FLOPs)"
)
DISTURBED_GAP = 0.10  # p50 ratio vs median of pair ratios: beyond 10% apart the timings were bimodal
DISTURBED_SHARE = 0.25  # more than a quarter of the pairs lost time to other processes
LOST_TIME = (0.10, 0.2)  # a run lost time: wall - CPU > 10% of its CPU time + 0.2 ms


@dataclass
class Speedup:
    """The headline speedup (`SPEEDUP_DEFINITION`) of one dense/slim pair of files, with the per-pair
    ratios it is the median of, the p50s of the same runs and how many pairs lost time to others."""

    dense: str
    slim: str
    target: str
    pairs: int
    median: float  # median of per-pair dense/slim latency ratios
    p10: float
    p90: float
    q25: float
    q75: float
    flops_ratio: float | None = None  # dense FLOPs / slim FLOPs
    efficiency: float | None = None  # median speedup / flops_ratio
    format: str | None = None  # the one format (and precision) both files are in
    ratios: tuple[float, ...] = ()  # the per-pair dense/slim ratios, in run order
    dense_p50_ms: float | None = None  # p50 of the dense runs of the same pairs
    slim_p50_ms: float | None = None  # p50 of the slim runs of the same pairs
    flops_source: str | None = None  # where the FLOPs came from
    lost_pairs: int | None = None  # pairs in which a run lost time to other processes (one thread only)
    cpu_ratio: float | None = None  # median of per-pair dense/slim CPU-time ratios (one thread only)

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def p50_ratio(self) -> float | None:
        """dense p50 / slim p50 of the same pairs: a different figure from the median of their ratios."""
        if not self.dense_p50_ms or not self.slim_p50_ms:
            return None
        return self.dense_p50_ms / self.slim_p50_ms

    @property
    def disturbance(self) -> str:
        """Why this measurement is not steady, or "" (`disturbance`)."""
        return disturbance(self.median, self.p50_ratio, self.pairs, self.lost_pairs, self.cpu_ratio)

    @property
    def disturbed(self) -> bool:
        return bool(self.disturbance)

    def text(self) -> str:
        """The headline with its spread; a disturbed measurement says so (`disturbance`)."""
        return speedup_text(self.median, self.p10, self.p90, self.disturbance)


def speedup_from_ratios(ratios: Sequence[float], dense: str, slim: str, target: str,
                        flops: tuple[float, float] | None = None) -> Speedup:  # fmt: skip
    """Median and spread of per-pair dense/slim ratios; efficiency if FLOPs (dense, slim) are given.

    With a FLOPs count of 0 on either side the FLOPs ratio and efficiency are None (shown as n/a).
    """
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no pairs: runs must be >= 1")
    p10, q25, med, q75, p90 = (float(v) for v in np.percentile(r, [10, 25, 50, 75, 90]))
    sp = Speedup(dense, slim, target, int(r.size), med, p10, p90, q25, q75, ratios=tuple(float(v) for v in r))
    return with_flops(sp, flops)


def with_flops(sp: Speedup, flops: tuple[float, float] | None, source: str | None = None) -> Speedup:
    """`sp` with the FLOPs ratio (dense/slim) and efficiency (speedup / FLOPs ratio) of `flops`; None
    (shown as n/a) without FLOPs or with a count of 0 on either side (e.g. a model of reshapes only)."""
    if flops is None or min(flops) <= 0:
        return dataclasses.replace(sp, flops_ratio=None, efficiency=None, flops_source=None)
    ratio = flops[0] / flops[1]
    return dataclasses.replace(sp, flops_ratio=ratio, efficiency=sp.median / ratio, flops_source=source)


def lost_time(wall_ms: Sequence[float], cpu_ms: Sequence[float]) -> list[bool]:
    """Per run: whether it lost time to other processes (wall exceeds the thread's CPU time, LOST_TIME)."""
    share, floor = LOST_TIME
    return [w - c > share * c + floor for w, c in zip(wall_ms, cpu_ms, strict=True)]


def with_waits(sp: Speedup, dense: dict[str, Sequence[float]], slim: dict[str, Sequence[float]]) -> Speedup:
    """`sp` with the pairs that lost time and the CPU-time ratio, from the runner's `latencies_ms` and
    `cpu_ms` of each model (call it for one-thread targets only: there the runtime computes on the
    thread whose CPU time is read)."""
    if "cpu_ms" not in dense or "cpu_ms" not in slim:
        return sp
    lost = [a or b for a, b in zip(lost_time(dense["latencies_ms"], dense["cpu_ms"]),
                                   lost_time(slim["latencies_ms"], slim["cpu_ms"]), strict=True)]  # fmt: skip
    cpu = [d / s for d, s in zip(dense["cpu_ms"], slim["cpu_ms"], strict=True) if s > 0]
    return dataclasses.replace(sp, lost_pairs=sum(lost), cpu_ratio=float(np.median(cpu)) if cpu else None)


def disturbance(
    median: float,
    p50_ratio: float | None,
    pairs: int | None = None,
    lost_pairs: int | None = None,
    cpu_ratio: float | None = None,
) -> str:
    """Why a speedup is not steady (see the module doc), or "" when it is."""
    gap = p50_ratio is not None and median > 0 and p50_ratio > 0
    gap = gap and abs(math.log(p50_ratio / median)) > math.log1p(DISTURBED_GAP)
    lost = bool(pairs) and lost_pairs is not None and lost_pairs > DISTURBED_SHARE * pairs
    if not gap and not lost:
        return ""
    why = [f"{lost_pairs} of {pairs} pairs lost time to other processes"] if lost else []
    if p50_ratio is not None:
        why.append(f"the p50 ratio of the same pairs is {p50_ratio:.2f}x")
    if cpu_ratio is not None:
        why.append(f"their CPU-time ratio {cpu_ratio:.2f}x")
    return "disturbed: " + ", ".join(why) + " (rerun on an idle core)"


def speedup_text(median: float, p10: float, p90: float, disturbed: str = "") -> str:
    """A speedup with its spread of per-pair ratios; a spread on both sides of 1.0 is said to be unclear
    (the pairs disagree on which model is faster, whatever the median says); `disturbed` (from
    `disturbance`) is appended."""
    text = f"{median:.2f}x ({p10:.2f}-{p90:.2f})"
    if p10 <= 1.0 <= p90:
        text += " unclear: the spread crosses 1.0"
    return f"{text}; {disturbed}" if disturbed else text
