"""The export and release steps `slimship run` and the CLI share: every format exported through its
registry record into one `ExportResult`, and one release made from the stages' records."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimship._util import sha256_bytes
from slimship.exporters.registry import ExportFailures, ExportRequest, export_formats
from slimship.pipeline.gates import GateResult
from slimship.pipeline.records import BenchFigures, CalibrationData, ExportResult
from slimship.pipeline.release import ReleaseInputs, ReleaseResult, write_release

Step = Callable[[str], contextlib.AbstractContextManager[dict[str, Any]]]  # a progress step: its info dict


@contextlib.contextmanager
def _silent(name: str) -> Iterator[dict[str, Any]]:
    yield {}


def export_stage(
    request: ExportRequest,
    formats: Iterable[str],
    out_dir: Path,
    stem: str,
    calibration: CalibrationData,
    step: Step = _silent,
    detail: Callable[[Any], str] | None = None,
) -> ExportResult:
    """Export `request.model` to each format (once each, in order) into `out_dir`, named by the format
    record; each exporter checks its parity. Every format is tried: the result holds the ones that passed
    and each failure's reason (`ExportResult.require_all` raises for a stage that needs them all). `step`
    wraps each format (the CLI's progress line, whose `detail` is said from the exporter's result)."""
    try:
        results = export_formats(formats, request, Path(out_dir), stem, lambda f: step(f"export {f}"), detail)
    except ExportFailures as exc:  # the formats that passed are kept
        return ExportResult(exc.results, calibration, exc.failures)
    return ExportResult(results, calibration)


def weights_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's floating-point weights (the source of a run's release)."""
    return sha256_bytes(
        b"".join(
            t.detach().contiguous().numpy().tobytes()
            for t in module.state_dict().values()
            if t.is_floating_point()
        )
    )


@dataclass(frozen=True)
class ReleaseRequest:
    """What one release is made of, from the stages' records (`slimship run` and `slimship release`):
    the bundle's name, version and folder, the slim module with its example inputs and the sha256 of its
    source, its exported files, the gates it passed, the config it came from; a run adds its bench figures,
    slimming summary, report plots and target definitions."""

    name: str
    version: str
    out: Path
    module: Any
    example: tuple[torch.Tensor, ...]
    source_sha256: str
    exports: ExportResult
    gates: Sequence[GateResult]
    config: dict[str, Any]
    bench: BenchFigures | None = None
    slimming: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    targets: dict[str, dict[str, Any]] | None = None


def release_inputs(request: ReleaseRequest) -> ReleaseInputs:
    """The ReleaseInputs of a request: files and parity from its exports, figures from its bench."""
    record = request.exports.calibration.record
    bench = request.bench
    return ReleaseInputs(
        name=request.name,
        version=request.version,
        slim_module=request.module,
        example_inputs=request.example,
        model_files=request.exports.files(),
        reference={"source_sha256": request.source_sha256},
        slimming=request.slimming,
        parity={fmt: p.to_dict() for fmt, p in request.exports.parity().items()},
        accuracy=bench.accuracy() if bench is not None else {},
        latency=bench.latency() if bench is not None else {},
        config=request.config,
        extra_plots=request.plots,
        model_card_notes=request.notes,
        gates=[g.to_dict() for g in request.gates],
        calibration=record.to_dict() if record is not None else None,
        targets=request.targets,
    )


def publish(request: ReleaseRequest) -> ReleaseResult:
    """Write the release bundle of `request` (see `write_release`: verified, never overwriting)."""
    return write_release(release_inputs(request), Path(request.out))
