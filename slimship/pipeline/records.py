"""The records the pipeline's stages hand each other, each frozen and each its own JSON (`to_dict`).

calibration -> `Calibration`; export -> `ExportResult` (per format: the exporter's result, its file and
parity); bench -> `BenchFigures` (per target and format: the `Measurement`s, the `Speedup`, the profile);
gates read `GateFigures` (slimship.pipeline.gates) made from these; the release is written from
`ReleaseInputs` (slimship.pipeline.release), whose fields are these records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Required, TypedDict

from slimship.exporters.registry import ExportFailures


@dataclass(frozen=True)
class Calibration:
    """What the int8 formats were calibrated on: how many samples, and where they came from."""

    samples: int
    source: str

    def to_dict(self) -> CalibrationRecord:
        return {"samples": self.samples, "source": self.source}


@dataclass(frozen=True)
class CalibrationData:
    """Calibration batches (tensor tuples) with their record; `real` when they are the user's own samples
    (data factory or --calibration), not the random fallback."""

    batches: list[tuple[Any, ...]] | None = None
    record: Calibration | None = None
    real: bool = False

    def real_batches(self) -> list[tuple[Any, ...]] | None:
        """The batches when they are the user's own samples (gates may score them), else None."""
        return self.batches if self.real else None

    def to_dict(self) -> CalibrationRecord | None:
        """The record {samples, source}, or None when nothing was calibrated."""
        return None if self.record is None else self.record.to_dict()


@dataclass(frozen=True)
class Parity:
    """An exported file against the slim PyTorch model: its largest differences and what verify accepts."""

    max_abs_diff: float
    max_rel_diff: float
    tolerance: float

    @classmethod
    def of(cls, report: Any) -> Parity:
        """From an exporter's ParityReport: its figures on the reference inputs a bundle stores (which
        `slimship verify` measures again by the same rule)."""
        figures = report.record()
        return cls(figures["max_abs_diff"], figures["max_rel_diff"], figures["tolerance"])

    def to_dict(self) -> dict[str, float]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "tolerance": self.tolerance,
        }


@dataclass(frozen=True)
class ExportResult:
    """The export stage: per format, the exporter's result (its file, bytes, parity, timings, notes), and
    what the int8 formats were calibrated on."""

    results: Mapping[str, Any]
    calibration: CalibrationData = field(default_factory=CalibrationData)
    failures: Mapping[str, str] = field(default_factory=dict)  # format -> why it failed (no file written)

    def require_all(self) -> None:
        """Raise ExportFailures (naming each failed format and its reason) unless every format passed."""
        if self.failures:
            raise ExportFailures(dict(self.results), dict(self.failures))

    def files(self) -> dict[str, Path]:
        return {fmt: Path(r.path) for fmt, r in self.results.items()}

    def parity(self) -> dict[str, Parity]:
        return {fmt: Parity.of(r.parity) for fmt, r in self.results.items()}

    def bytes(self) -> dict[str, int]:
        return {fmt: int(r.bytes) for fmt, r in self.results.items()}


def percent(fraction: float | None) -> float | None:
    """Runtimes report accuracy as a fraction; the pipeline speaks in percent like evaluate_accuracy."""
    return None if fraction is None else round(100.0 * fraction, 3)


@dataclass(frozen=True)
class BenchEntry:
    """One format on one target. `checked` ran the evaluation batches (accuracy, agreement, parity, memory);
    on a device target `timed`/`dense` are the interleaved slim and dense timings and `speedup` their ratio;
    an emulated target has `checked` only (its timings are not a device's)."""

    target: str
    format: str
    emulated: bool
    checked: Any  # runtimes.measure.Measurement
    timed: Any = None  # Measurement of the slim file, interleaved with `dense`
    dense: Any = None
    speedup: Any = None  # runtimes.measure.Speedup
    where: str | None = None  # "local profile (this machine)" or "device (ssh://...)"
    profile: dict[str, Any] | None = None  # per-layer dense vs slim (bench.profile)

    @property
    def subject(self) -> str:
        return f"{self.target}/{self.format}"

    @property
    def variant(self) -> str:
        return f"slim-{self.format}@{self.target}"

    @property
    def max_abs_diff(self) -> float | None:
        return self.checked.parity.max_abs if self.checked.parity else None

    def latency_record(self) -> LatencyRecord:
        """The manifest's latency entry (filed under latency.emulated or latency.device): the slim file's
        timings with their per-run samples; with a dense partner, the speedup (median of the per-pair
        ratios, which it carries) and the dense timings of the same pairs."""
        timed = self.timed or self.checked
        stats = timed.latency
        record: LatencyRecord = {
            "target": self.target, "format": self.format, "emulated": self.emulated,
            "p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "p99_ms": stats.p99_ms,
        }  # fmt: skip
        if self.emulated:
            return record
        record |= {
            "precision": timed.precision,
            "where": self.where,
            "runtime": timed.runtime.get("backend"),
            "samples": list(stats.samples),
            "model_rss_kb": self.checked.model_rss_kb,  # its own load and first run, in a fresh process
            "variant": self.variant,
        }
        speedup = self.speedup
        if speedup is None or self.dense is None:
            return record
        return record | {
            "dense_p50_ms": self.dense.latency.p50_ms,
            "dense_samples": list(self.dense.latency.samples),
            "speedup": round(speedup.median, 4),
            "speedup_p10": round(speedup.p10, 4),
            "speedup_p90": round(speedup.p90, 4),
            "pairs": speedup.pairs,
            "pair_ratios": list(speedup.ratios),
            "lost_pairs": speedup.lost_pairs,  # pairs that lost time to other processes (one thread only)
            "cpu_ratio": round(speedup.cpu_ratio, 4) if speedup.cpu_ratio else None,
            "flops_ratio": round(speedup.flops_ratio, 4) if speedup.flops_ratio else None,
            "efficiency": round(speedup.efficiency, 4) if speedup.efficiency else None,
            "dense_variant": "dense-torch",
        }

    def accuracy_record(self) -> AccuracyRecord:
        return {
            "top1": percent(self.checked.accuracy),
            "agreement": self.checked.agreement,
            "max_abs_diff": self.max_abs_diff,
        }

    def summary_row(self) -> dict[str, Any]:
        """The row of the run's summary (and its JSON `latency` list)."""
        top1 = percent(self.checked.accuracy)
        if self.emulated:
            return {"target": self.target, "format": self.format, "emulated": True, "accuracy": top1,
                    "max_abs_diff": self.max_abs_diff}  # fmt: skip
        return self.latency_record() | {"accuracy": top1}


@dataclass(frozen=True)
class BenchFigures:
    """The bench stage: one entry per target and format it ran, in order, and the torch models' top-1."""

    entries: tuple[BenchEntry, ...] = ()
    dense_top1: float | None = None
    slim_top1: float | None = None
    agreement_on: str | None = None  # what agreement was measured on: "evaluation data (200 samples)", ...
    timed: bool = True  # False: the latencies are not figures to publish (a release not asked to time)

    def latency(self) -> dict[str, LatencyRecord]:
        return {e.subject: e.latency_record() for e in self.entries} if self.timed else {}

    def untimed(self) -> BenchFigures:
        """These figures without their latency (a release that was not asked to time its files)."""
        return replace(self, timed=False)

    def accuracy(self) -> dict[str, AccuracyRecord]:
        """Per variant its figures; the torch models' top-1 where it was measured (no rows of nothing)."""
        torch_rows = {"dense-torch": {"top1": self.dense_top1}, "slim-torch": {"top1": self.slim_top1}}
        if self.dense_top1 is None and self.slim_top1 is None:
            torch_rows = {}
        return {e.variant: e.accuracy_record() for e in self.entries} | torch_rows

    def rows(self) -> list[dict[str, Any]]:
        return [e.summary_row() for e in self.entries]

    def agreement_said(self, results: Sequence[Any]) -> list[Any]:
        """Gate results (`slimship.pipeline.gates.GateResult`) with each measured `min_agreement` (one with
        a figure) saying what it was measured on (`agreement_on`)."""
        if not self.agreement_on:
            return list(results)
        said = f"measured on {self.agreement_on}"
        return [replace(r, detail=said) if r.gate == "min_agreement" and r.figure is not None else r
                for r in results]  # fmt: skip

    def profiles(self) -> list[dict[str, Any]]:
        return [
            e.profile | {"target": e.target, "format": e.format}
            for e in self.entries
            if e.profile is not None
        ]


# ------------------------------------------------------------------ the manifest's sections (ReleaseInputs)
# Plain mappings at run time (a library caller passes dicts; manifest.schema.json checks them when the
# bundle is written); their keys and value types here, for the pipeline and a type checker.


class TensorSpecRecord(TypedDict, total=False):
    name: Required[str]
    shape: list[int | str]
    dtype: str


class ModelReference(TypedDict, total=False):
    """`model` of the manifest: the source's hash, and what is known of the inputs and outputs."""

    source_sha256: Required[str]
    inputs: list[TensorSpecRecord]
    outputs: list[TensorSpecRecord]
    input_names: list[str]
    output_names: list[str]
    layout: str
    preprocessing: str


class ParityRecord(TypedDict, total=False):
    """`parity[role]`: the file's largest differences from the slim PyTorch model, and what verify accepts."""

    max_abs_diff: Required[float]
    max_rel_diff: float
    tolerance: Required[float]


class LatencyRecord(TypedDict, total=False):
    """`latency[target/format]` (see BenchEntry.latency_record; filed under device or emulated)."""

    emulated: Required[bool]
    p50_ms: Required[float]
    p90_ms: Required[float]
    p99_ms: Required[float]
    target: str
    format: str
    precision: str
    where: str | None
    runtime: str | None
    dense_p50_ms: float
    speedup: float
    speedup_p10: float
    speedup_p90: float
    pairs: int
    pair_ratios: list[float]  # the per-pair dense/slim ratios `speedup` is the median of
    lost_pairs: int | None
    cpu_ratio: float | None
    flops_ratio: float | None
    efficiency: float | None
    model_rss_kb: int | None
    variant: str
    dense_variant: str
    samples: list[float]
    dense_samples: list[float]


AccuracyRecord = dict[str, float | None]  # `accuracy[variant]`: metric (top1, top5, agreement, ...) -> value


class GateRecord(TypedDict, total=False):
    """`gates[i]` (GateResult.to_dict)."""

    gate: Required[str]
    status: Required[str]
    subject: str
    figure: float | None
    limit: float | None
    detail: str


class CalibrationRecord(TypedDict):
    """`calibration` (Calibration.to_dict)."""

    samples: int
    source: str


class TargetRecord(TypedDict, total=False):
    """`targets[name]` (explain.target_record)."""

    runtime: str
    threads: int | None
    affinity: list[int]
    xnnpack: bool
    precision: str
    transport: str
    emulated: bool
    description: str
