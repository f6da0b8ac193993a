"""Quality gates: what a release must meet, decided on measured figures before anything is published.

A gate is one `GateRule` in `GATE_RULES` (what it reads from `GateFigures`, how a figure compares with the
limit, its command-line option) and one field of `GatesSpec` (its limit, checked like the rest of the
config). `GateFigures.of(bench)` fills every figure from the bench stage's typed records, for `slimship run`
and `slimship release` alike. A gate set to None is off. A gate that is on but has no figure (no
evaluation data, no quantised variant, no timed target) is "not evaluated": listed as such, never counted
as passed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from pydantic import Field

from slimship.errors import GateError
from slimship.exporters.registry import FORMATS
from slimship.pipeline.records import BenchFigures
from slimship.pipeline.section import Section, spec_field

PASSED, FAILED, NOT_EVALUATED, OFF = "passed", "failed", "not evaluated", "off"
# formats whose top-1 agreement with the slim model is gated: the registry's reduced-precision ones
QUANTISED_FORMATS: tuple[str, ...] = tuple(name for name, r in FORMATS.items() if r.precision != "fp32")
TORCH_SUBJECT = "torch top-1"  # the subject of a figure on the torch models, not on a target/format
TEXT_GENERATION = "text-generation"  # the task of a decoder release (slimship.decoder.release)


class GatesSpec(Section):
    """What a release must meet; a gate set to null is off. See slimship.pipeline.gates."""

    max_accuracy_drop: float | None = spec_field(
        1.0, "percentage points of top-1 the slim model may lose against the dense one (>= 0), or null", ge=0
    )
    min_speedup: float | None = spec_field(
        None, "the smallest dense/slim speedup accepted per target (> 0), or null", gt=0
    )
    max_latency_ms: Annotated[float, Field(gt=0)] | dict[str, Annotated[float, Field(gt=0)]] | None = (
        spec_field(
            None,
            "the largest p50 latency in ms, one number for every target or a mapping target -> ms, or null",
        )
    )
    min_agreement: float | None = spec_field(
        0.9, "the smallest top-1 agreement of quantised variants with the slim model, in [0, 1], or null",
        ge=0, le=1,
    )  # fmt: skip
    min_decode_speedup: float | None = spec_field(
        None, "text generation: the smallest dense/slim decode speedup per file (> 0), or null", gt=0
    )
    max_ms_per_token: Annotated[float, Field(gt=0)] | dict[str, Annotated[float, Field(gt=0)]] | None = (
        spec_field(
            None,
            "text generation: the largest median decode ms per token, one number or a mapping target -> ms, "
            "or null",
        )
    )
    min_token_agreement: float | None = spec_field(
        None, "text generation: the smallest next-token top-1 agreement of quantised files with the slim "
        "model along the stored reference decode, in [0, 1], or null", ge=0, le=1,
    )  # fmt: skip


@dataclass(frozen=True)
class GateFigures:
    """What the gates read: top-1 in percent of the torch models on the same evaluation data, and per
    bench subject (`target/format`) the figures measured there."""

    dense_top1: float | None = None
    slim_top1: float | None = None
    speedup: Mapping[str, float] = field(default_factory=dict)  # interleaved, same format (device targets)
    p50_ms: Mapping[str, float] = field(default_factory=dict)  # device targets
    agreement: Mapping[str, float] = field(default_factory=dict)  # quantised variants vs the slim model
    # text generation (slimship.decoder.release), per `target/format`
    decode_speedup: Mapping[str, float] = field(default_factory=dict)  # interleaved dense/slim decode time
    ms_per_token: Mapping[str, float] = field(default_factory=dict)  # median decode ms per token
    token_agreement: Mapping[str, float] = field(default_factory=dict)  # quantised files vs the slim model

    @classmethod
    def of(cls, bench: BenchFigures) -> GateFigures:
        """Every figure a gate reads, from the bench stage's records (run and release alike)."""
        speedup, p50, agreement = {}, {}, {}
        for entry in bench.entries:
            if not entry.emulated:
                p50[entry.subject] = (entry.timed or entry.checked).latency.p50_ms
                if entry.speedup is not None:
                    speedup[entry.subject] = round(entry.speedup.median, 4)
            if entry.format in QUANTISED_FORMATS and entry.checked.agreement is not None:
                agreement[entry.subject] = entry.checked.agreement
        return cls(bench.dense_top1, bench.slim_top1, speedup, p50, agreement)

    def accuracy_drop(self) -> dict[str, float]:
        if self.dense_top1 is None or self.slim_top1 is None:
            return {}
        return {TORCH_SUBJECT: round(self.dense_top1 - self.slim_top1, 3)}


@dataclass(frozen=True)
class GateRule:
    """One gate: its figures, how a figure compares with the limit, and its command-line option."""

    what: str
    figures: Callable[[GateFigures], Mapping[str, float]]
    ok: Callable[[float, float], bool]
    unit: str
    missing: str  # why a gate that is on can have no figure
    metavar: str  # the CLI option's value (--NAME METAVAR)
    help: str  # the CLI option's help
    task: str | None = None  # what the gate applies to: None one-pass models, "text-generation" decoders


GATE_RULES: dict[str, GateRule] = {
    "max_accuracy_drop": GateRule(
        "top-1 drop, slim vs dense", GateFigures.accuracy_drop, operator.le, " pt", "no evaluation data",
        "POINTS", "top-1 points the slim model may lose against the dense one (omitted: 1)",
    ),
    "min_speedup": GateRule(
        "speedup", lambda f: f.speedup, operator.ge, "x", "no interleaved timing on a device target",
        "X", "smallest dense/slim speedup per target (omitted: off)",
    ),
    "max_latency_ms": GateRule(
        "p50 latency", lambda f: f.p50_ms, operator.le, " ms", "no timing on a device target",
        "MS", "largest p50 latency per target (omitted: off)",
    ),
    "min_agreement": GateRule(
        "top-1 agreement with the slim model", lambda f: f.agreement, operator.ge, "", "no quantised variant",
        "FRACTION", "top-1 agreement of quantised variants with the slim model (omitted: 0.9)",
    ),
    "min_decode_speedup": GateRule(
        "decode speedup", lambda f: f.decode_speedup, operator.ge, "x", "no dense file of its kind (--dense)",
        "X", "text generation: smallest dense/slim decode speedup per file (omitted: off)", TEXT_GENERATION,
    ),
    "max_ms_per_token": GateRule(
        "decode ms per token", lambda f: f.ms_per_token, operator.le, " ms", "no decode timing",
        "MS", "text generation: largest median decode ms per token per file (omitted: off)", TEXT_GENERATION,
    ),
    "min_token_agreement": GateRule(
        "next-token top-1 agreement with the slim model", lambda f: f.token_agreement, operator.ge, "",
        "no quantised file", "FRACTION",
        "text generation: next-token top-1 agreement of quantised files with the slim model (omitted: off)",
        TEXT_GENERATION,
    ),
}  # fmt: skip


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


def evaluate_gates(gates: GatesSpec, figures: GateFigures, task: str | None = None) -> list[GateResult]:
    """Every gate of `gates` for `task` (None: a one-pass model) against `figures`, in GATE_RULES order.

    A gate of another task is left out, or listed as not evaluated when it was set explicitly."""
    results: list[GateResult] = []
    for name, rule in GATE_RULES.items():
        limit = getattr(gates, name)
        if rule.task != task:
            if limit is not None and name in gates.model_fields_set:
                what = f"applies to {rule.task} releases" if rule.task else "applies to one-pass models"
                results.append(GateResult(name, NOT_EVALUATED, detail=what))
            continue
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
