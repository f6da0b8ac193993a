"""The export and release steps `slimship run` and the CLI share: every format exported through its
registry record into one `ExportResult`, and one release made from the stages' records."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from slimship._util import sha256_bytes
from slimship.exporters.common import torch_outputs
from slimship.exporters.judge import judge_file
from slimship.exporters.registry import ExportFailures, ExportRequest, export_formats, get_format
from slimship.pipeline.export_index import (
    ExportIndex,
    Provenance,
    ReusedExport,
    atomic_copy,
    data_sha256,
    record_exports,
)
from slimship.pipeline.export_index import reuse as reuse_file
from slimship.pipeline.gates import GateResult
from slimship.pipeline.manifest import io_record
from slimship.pipeline.records import BenchFigures, CalibrationData, ExportResult
from slimship.pipeline.release import ReleaseInputs, ReleaseResult, write_release
from slimship.sources import output_names

Step = Callable[[str], contextlib.AbstractContextManager[dict[str, Any]]]  # a progress step: its info dict


@contextlib.contextmanager
def _silent(name: str) -> Iterator[dict[str, Any]]:
    yield {}


@dataclass(frozen=True)
class Reuse:
    """Where an export stage looks for files already exported and checked (`index`), keyed by the model's
    content (`provenance`); `record` also adds the stage's new exports to that index (a cache folder)."""

    index: ExportIndex
    provenance: Provenance
    record: bool = False


def export_stage(
    request: ExportRequest,
    formats: Iterable[str],
    out_dir: Path,
    stem: str,
    calibration: CalibrationData,
    step: Step = _silent,
    detail: Callable[[Any], str] | None = None,
    reuse: Reuse | None = None,
) -> ExportResult:
    """Export `request.model` to each format (once each, in order) into `out_dir`, named by the format
    record; each exporter checks its parity. Every format is tried: the result holds the ones that passed
    and each failure's reason (`ExportResult.require_all` raises for a stage that needs them all). `step`
    wraps each format (the CLI's progress line, whose `detail` is said from the exporter's result).
    With `reuse`, a format whose checked file is in `reuse.index` for the same inputs is copied from there
    instead (see slimship.pipeline.export_index)."""
    formats = list(dict.fromkeys(formats))
    request = _own_inputs(request)
    reused = _reused(request, formats, Path(out_dir), stem, reuse, step) if reuse is not None else {}
    todo = [f for f in formats if f not in reused]
    failures: dict[str, str] = {}
    try:
        results = export_formats(todo, request, Path(out_dir), stem, lambda f: step(f"export {f}"), detail)
    except ExportFailures as exc:  # the formats that passed are kept
        results, failures = exc.results, exc.failures
    if reuse is not None and reuse.record and results:
        _record(reuse, request, results)
    ordered = {f: reused.get(f) or results[f] for f in formats if f in reused or f in results}
    return ExportResult(ordered, calibration, failures)


def _own_inputs(request: ExportRequest) -> ExportRequest:
    """`request` with copies of its example tensors: torch.export tags the tensors it traces with (its
    `_dynamo_*` attributes, pickled with them), and the caller's example goes on into the release's .pt2,
    which must not depend on which formats were exported rather than reused."""
    copies: dict[int, Any] = {}

    def copy(tensors: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(copies.setdefault(id(t), t.clone()) if torch.is_tensor(t) else t for t in tensors)

    return replace(request, example=copy(request.example), trace_example=copy(request.trace_example))


def _reused(
    request: ExportRequest, formats: list[str], out_dir: Path, stem: str, reuse: Reuse, step: Step
) -> dict[str, ReusedExport]:
    """The formats whose checked file `reuse.index` holds for these inputs, copied into `out_dir`."""
    found, data = {}, data_sha256(request)
    for name in formats:
        record = get_format(name)
        key = reuse.provenance.key(record, request)
        if reuse.index.find(key) is None:
            continue
        with step(f"reuse {name}") as info:
            judge = partial(judge_file, record, request)
            result = reuse_file(reuse.index, key, record, out_dir / record.file_name(stem), data, judge)
            if result is not None:
                found[name] = result
            info["detail"] = f"from {result.reused_from}" if result else "not reusable (-v says why): export"
    return found


def _record(reuse: Reuse, request: ExportRequest, results: dict[str, Any]) -> None:
    """Copy the new exports into the cache folder under content-addressed names, and index them."""
    files = {}
    for fmt, result in results.items():
        source = Path(result.path)
        dest = reuse.index.folder / f"{result.sha256[:16]}-{source.name}"
        if not dest.is_file():
            reuse.index.folder.mkdir(parents=True, exist_ok=True)
            atomic_copy(source, dest)
        files[fmt] = (dest, result)
    record_exports(reuse.index, reuse.provenance, request, files)


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
        reference={"source_sha256": request.source_sha256, **_io(request)},
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


def _io(request: ReleaseRequest) -> dict[str, Any]:
    """Input/output names and shapes as the request's exported files carry them (see `io_record`)."""
    outputs = torch_outputs(request.module, request.example)
    results = request.exports.results.values()
    dynamic = bool(results) and all(getattr(r, "dynamic_batch", False) for r in results)
    return io_record(
        [list(t.shape) for t in request.example], [list(o.shape) for o in outputs],
        output_names(request.module, request.example), dynamic,
    )  # fmt: skip


def publish(request: ReleaseRequest) -> ReleaseResult:
    """Write the release bundle of `request` (see `write_release`: verified, never overwriting)."""
    return write_release(release_inputs(request), Path(request.out))
