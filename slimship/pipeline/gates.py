"""Quality gates: what a release must meet, decided on measured figures before anything is published.

One rule per gate (`GATE_RULES`): which figures it reads and how a figure compares with the limit.
A gate set to None is off. A gate that is on but has no figure (no evaluation data, no quantised
variant, no timed target) is "not evaluated": listed as such, never counted as passed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from slimship.errors import GateError
from slimship.exporters.registry import FORMATS

PASSED, FAILED, NOT_EVALUATED, OFF = "passed", "failed", "not evaluated", "off"
# formats whose top-1 agreement with the slim model is gated: the registry's reduced-precision ones
QUANTISED_FORMATS: tuple[str, ...] = tuple(name for name, r in FORMATS.items() if r.precision != "fp32")


@dataclass
class Figures:
    """What the gates read: top-1 in percent on the same evaluation data, and per `target/format`."""

    dense_top1: float | None = None
    slim_top1: float | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # interleaved, same format (non-emulated)
    p50_ms: dict[str, float] = field(default_factory=dict)  # non-emulated
    agreement: dict[str, float] = field(default_factory=dict)  # quantised variants vs the slim model

    def accuracy_drop(self) -> dict[str, float]:
        if self.dense_top1 is None or self.slim_top1 is None:
            return {}
        return {"torch top-1": round(self.dense_top1 - self.slim_top1, 3)}


@dataclass(frozen=True)
class GateRule:
    what: str
    figures: Callable[[Figures], dict[str, float]]
    ok: Callable[[float, float], bool]
    unit: str
    missing: str  # why a gate that is on can have no figure


GATE_RULES: dict[str, GateRule] = {
    "max_accuracy_drop": GateRule(
        "top-1 drop, slim vs dense", Figures.accuracy_drop, operator.le, " pt", "no evaluation data"
    ),
    "min_speedup": GateRule(
        "speedup", lambda f: f.speedup, operator.ge, "x", "no interleaved timing on a device target"
    ),
    "max_latency_ms": GateRule(
        "p50 latency", lambda f: f.p50_ms, operator.le, " ms", "no timing on a device target"
    ),
    "min_agreement": GateRule(
        "top-1 agreement with the slim model", lambda f: f.agreement, operator.ge, "", "no quantised variant"
    ),
}


@dataclass(frozen=True)
class GateResult:
    """One gate on one subject (a target/format, or the torch models)."""

    gate: str
    status: str
    subject: str = ""
    figure: float | None = None
    limit: float | None = None
    detail: str = ""

    def line(self) -> str:
        rule = GATE_RULES[self.gate]
        where = f" {self.subject}" if self.subject else ""
        if self.status in (PASSED, FAILED):
            sign = "<=" if rule.ok is operator.le else ">="
            fig = f"{self.figure:.4g}{rule.unit} (limit {sign} {self.limit:.4g}{rule.unit})"
            return f"{self.gate}{where}: {rule.what} {fig}: {self.status}"
        return f"{self.gate}{where}: {self.status}" + (f" ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _limit_for(limit: Any, subject: str) -> float | None:
    """A limit is one number, or a mapping target -> number (a subject is 'target/format')."""
    if isinstance(limit, dict):
        return limit.get(subject.split("/", 1)[0])
    return limit


def evaluate_gates(gates: Any, figures: Figures) -> list[GateResult]:
    """Every gate of `gates` (a GatesSpec or mapping) against `figures`, in GATE_RULES order."""
    spec = gates if isinstance(gates, dict) else gates.model_dump()
    results: list[GateResult] = []
    for name, rule in GATE_RULES.items():
        limit = spec.get(name)
        if limit is None:
            results.append(GateResult(name, OFF))
            continue
        checked = []
        for subject, value in sorted(rule.figures(figures).items()):
            bound = _limit_for(limit, subject)
            if bound is None or value is None:
                continue
            status = PASSED if rule.ok(value, bound) else FAILED
            checked.append(GateResult(name, status, subject, value, bound))
        results += checked or [GateResult(name, NOT_EVALUATED, detail=rule.missing)]
    return results


def enforce(results: list[GateResult]) -> None:
    """Raise GateError listing every failed gate with its figures."""
    failed = [r for r in results if r.status == FAILED]
    if failed:
        raise GateError("; ".join(r.line() for r in failed) + "; nothing was published")
