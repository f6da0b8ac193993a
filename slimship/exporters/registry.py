"""The one table of deployment formats: every place that dispatches on a format reads it.

A record says what a format is called, the file suffix it writes, its precision, which runtimes open it,
which optional package it needs, and how to export to it (`export`, one signature for all formats).
Adding a format is one record here plus its exporter module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from slimship.errors import ExportError, SlimshipError
from slimship.exporters.common import check_reference


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """What every exporter is given: the model, its example inputs (a device's batch and a batch-2 trace
    example for a dynamic batch), calibration and evaluation batches."""

    model: Any
    example: tuple[Any, ...]
    trace_example: tuple[Any, ...]
    calibration: list[Any] | None = None
    eval_batches: list[Any] | None = None
    dynamic_batch: bool = True
    output_names: list[str] | None = None  # names from the model's output structure (e.g. logits)


@dataclasses.dataclass(frozen=True)
class FormatRecord:
    """One deployment format."""

    name: str
    family: str  # "onnx" | "tflite" | "executorch": the kind of file
    suffix: str
    precision: str  # fp32 | fp16 | int8-dynamic | int8
    runtimes: tuple[str, ...]  # runtimes (see runtimes.registry) that open the file
    exporter: Callable[[ExportRequest, Path], Any]
    extra: str | None = None  # the optional package extra it needs, e.g. "executorch"
    description: str = ""
    task: str | None = None  # "text-generation": a decoder with its KV cache only (`--task text-generation`)

    @property
    def quantised(self) -> bool:
        return self.precision not in ("fp32", "fp16")

    @property
    def calibrated(self) -> bool:
        """Static int8: activation ranges come from calibration data (dynamic and weight-only need none)."""
        return self.precision == "int8"

    def file_name(self, stem: str) -> str:
        """The bundle / export file name of this format for a model called `stem`."""
        tail = "" if (self.family, self.precision) == ("onnx", "fp32") else f".{self.precision}"
        return f"{stem}{tail}{self.suffix}"

    def export(self, request: ExportRequest, path: Path) -> Any:
        return self.exporter(request, Path(path))


def _onnx(request: ExportRequest, path: Path) -> Any:
    from slimship.exporters.onnx_export import export_onnx

    return export_onnx(
        request.model, request.trace_example, path, dynamic_batch=request.dynamic_batch,
        output_names=request.output_names, reference_inputs=request.example,
    )  # fmt: skip


def _onnx_quantised(variant: str) -> Callable[[ExportRequest, Path], Any]:
    def export(request: ExportRequest, path: Path) -> Any:
        from slimship.exporters.onnx_quant import export_onnx_quantised

        return export_onnx_quantised(
            request.model, request.trace_example, path, variant=variant, calibration=request.calibration,
            eval_batches=request.eval_batches, dynamic_batch=request.dynamic_batch,
            output_names=request.output_names, reference_inputs=request.example,
        )  # fmt: skip

    return export


def _tflite(variant: str) -> Callable[[ExportRequest, Path], Any]:
    def export(request: ExportRequest, path: Path) -> Any:
        from slimship.exporters.tflite_export import export_tflite

        return export_tflite(
            request.model, request.example, path, variant=variant, calibration=request.calibration,
            eval_batches=request.eval_batches, reference_inputs=request.example,
        )  # fmt: skip

    return export


def _executorch(variant: str) -> Callable[[ExportRequest, Path], Any]:
    def export(request: ExportRequest, path: Path) -> Any:
        from slimship.exporters.executorch_export import export_executorch

        return export_executorch(
            request.model, request.trace_example, path, variant=variant, calibration=request.calibration,
            eval_batches=request.eval_batches, dynamic_batch=request.dynamic_batch,
            reference_inputs=request.example,
        )  # fmt: skip

    return export


def _text_generation_only(name: str) -> Callable[[ExportRequest, Path], Any]:
    def export(request: ExportRequest, path: Path) -> Any:
        raise ExportError(f"{name} is a text-generation format: export a decoder with --task text-generation")

    return export


_TFLITE_RUNTIMES = ("litert", "tflite_runtime")
FORMATS: dict[str, FormatRecord] = {
    record.name: record
    for record in (
        FormatRecord("onnx", "onnx", ".onnx", "fp32", ("onnxruntime",), _onnx,
                     description="ONNX (opset 18) after slimship's surgery passes"),
        FormatRecord("onnx-fp16", "onnx", ".onnx", "fp16", ("onnxruntime",), _onnx_quantised("fp16"),
                     description="ONNX, float16 weights and compute (float32 inputs and outputs)"),
        FormatRecord("onnx-int8-dynamic", "onnx", ".onnx", "int8-dynamic", ("onnxruntime",),
                     _onnx_quantised("int8-dynamic"),
                     description="ONNX, int8 weights, dynamic-range kernels"),
        FormatRecord("onnx-int8", "onnx", ".onnx", "int8", ("onnxruntime",), _onnx_quantised("int8"),
                     description="ONNX, static int8 QDQ (per-channel weights, calibrated)"),
        FormatRecord("tflite-fp32", "tflite", ".tflite", "fp32", _TFLITE_RUNTIMES, _tflite("fp32"),
                     description="LiteRT flatbuffer, float32"),
        FormatRecord("tflite-fp16", "tflite", ".tflite", "fp16", _TFLITE_RUNTIMES, _tflite("fp16"),
                     description="LiteRT, float16 weights"),
        FormatRecord("tflite-int8-dynamic", "tflite", ".tflite", "int8-dynamic", _TFLITE_RUNTIMES,
                     _tflite("int8-dynamic"), description="LiteRT, int8 weights, dynamic-range kernels"),
        FormatRecord("tflite-int8", "tflite", ".tflite", "int8", _TFLITE_RUNTIMES, _tflite("int8"),
                     description="LiteRT, full int8 (calibrated)"),
        FormatRecord("executorch-fp32", "executorch", ".pte", "fp32", ("executorch",), _executorch("fp32"),
                     extra="executorch", description="ExecuTorch, XNNPACK, float32"),
        FormatRecord("executorch-int8", "executorch", ".pte", "int8", ("executorch",), _executorch("int8"),
                     extra="executorch", description="ExecuTorch, XNNPACK, int8 (calibrated)"),
        FormatRecord("executorch-8da4w", "executorch", ".pte", "8da4w", ("executorch",),
                     _text_generation_only("executorch-8da4w"), extra="executorch", task="text-generation",
                     description="ExecuTorch, XNNPACK, int8 dynamic activations, int4 weights (decoders)"),
        FormatRecord("onnx-int4", "onnx", ".onnx", "int4", ("onnxruntime",),
                     _text_generation_only("onnx-int4"), task="text-generation",
                     description="ONNX, int4 weights (MatMulNBits), float activations (decoders)"),
    )
}  # fmt: skip

FAMILY_BY_SUFFIX: dict[str, str] = {r.suffix: r.family for r in FORMATS.values()}


def get_format(name: str) -> FormatRecord:
    """The record of format `name`; ExportError lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown format {name!r}; known: {', '.join(FORMATS)}") from None


def family_of(path: str | Path) -> str | None:
    """The format family of a model file by its suffix (onnx, tflite, executorch), or None."""
    return FAMILY_BY_SUFFIX.get(Path(path).suffix.lower())


def precision_from_name(path: str | Path) -> str | None:
    """The precision a file name states (`FormatRecord.file_name`'s STEM.PRECISION.EXT, STEM-PRECISION.EXT,
    or a format name as stem such as executorch-int8.pte), or None."""
    stem = Path(path).name[: -len(Path(path).suffix) or None]
    for name, record in FORMATS.items():
        if stem == name or stem.endswith(f".{name}"):
            return record.precision
    for precision in sorted({r.precision for r in FORMATS.values()}, key=len, reverse=True):
        if stem == precision or stem.endswith((f".{precision}", f"-{precision}", f"_{precision}")):
            return precision
    return None


def _file_precision(path: Path, family: str) -> str | None:
    if family == "onnx":
        from slimship.exporters.onnx_export import onnx_precision

        return onnx_precision(path)
    if family == "tflite":
        from slimship.exporters.tflite_compat import tflite_precision

        return tflite_precision(path)
    return precision_from_name(path)  # an ExecuTorch program does not say (XNNPACK payloads are opaque)


def format_of_file(path: str | Path) -> FormatRecord | None:
    """The format of a model file: its family by suffix, its precision read from the file (ONNX, TFLite) or
    its name (ExecuTorch); None when either is unknown."""
    path = Path(path)
    family = family_of(path)
    if family is None:
        return None
    precision = _file_precision(path, family)
    return next((r for r in FORMATS.values() if r.family == family and r.precision == precision), None)


def formats_for_runtime(runtime: str) -> list[str]:
    return [name for name, record in FORMATS.items() if runtime in record.runtimes]


def format_for_runtime(runtime: str, precision: str = "fp32") -> FormatRecord:
    """The first format of `precision` that `runtime` opens (`auto`: onnxruntime's); ExportError if none."""
    runtime = "onnxruntime" if runtime == "auto" else runtime
    for record in FORMATS.values():
        if record.precision == precision and runtime in record.runtimes:
            return record
    raise ExportError(f"runtime {runtime!r} opens no {precision} format; known runtimes: "
                      f"{', '.join(sorted({r for f in FORMATS.values() for r in f.runtimes}))}")  # fmt: skip


class ExportFailures(ExportError):
    """Some formats of a multi-format export failed. `results` holds the formats that passed (their files
    are written and checked), `failures` each failed format's reason (its file is removed)."""

    def __init__(self, results: dict[str, Any], failures: dict[str, str]) -> None:
        self.results, self.failures = results, failures
        lines = "\n  ".join(f"{name}: {reason}" for name, reason in failures.items())
        kept = f"; kept {', '.join(results)}" if results else ""
        total = len(failures) + len(results)
        super().__init__(f"{len(failures)} of {total} formats failed{kept}:\n  {lines}")


#: a context manager per format ("export NAME"), yielding a dict whose "detail" is shown when it ends
Progress = Callable[[str], AbstractContextManager[dict[str, Any]]]


def export_formats(
    names: Iterable[str],
    request: ExportRequest,
    out_dir: Path,
    stem: str,
    progress: Progress | None = None,
    detail: Callable[[Any], str] | None = None,
) -> dict[str, Any]:
    """Export to each named format in `out_dir` (file names from `FormatRecord.file_name`), every one even
    when another fails (see `export_each`). `progress(name)` wraps each format; its detail is
    `detail(result)` (default `describe`)."""
    names = list(dict.fromkeys(names))
    if any(get_format(name).task is None for name in names):
        check_reference(request.model, request.example, request.output_names)
    path_of = lambda name: Path(out_dir) / get_format(name).file_name(stem)  # noqa: E731
    run = lambda name: get_format(name).export(request, path_of(name))  # noqa: E731
    return export_each(names, run, path_of, progress, detail or describe)


def export_each(
    names: Iterable[str],
    export: Callable[[str], Any],
    path_of: Callable[[str], Path],
    progress: Progress | None,
    detail: Callable[[Any], str],
) -> dict[str, Any]:
    """`export(name)` for each name (once each, in order), every one even when another fails: a format
    that raises a SlimshipError leaves no file at `path_of(name)` and, once all are done, ExportFailures
    is raised with the results that passed and each failure's reason. `progress(name)` wraps each
    format; its detail is `detail(result)`."""
    results, failures = {}, {}
    for name in dict.fromkeys(names):
        path = path_of(name)
        try:
            with progress(name) if progress else nullcontext({}) as info:
                results[name] = export(name)
                info["detail"] = detail(results[name])
        except SlimshipError as exc:
            path.unlink(missing_ok=True)
            failures[name] = str(exc)
    if failures:
        raise ExportFailures(results, failures)
    return results


def describe(result: Any) -> str:
    """One line on an exported file: its verdict's figures and its stages' seconds."""
    parity = result.parity
    top1 = "" if parity.top1_agreement is None else f", top-1 agreement {parity.top1_agreement:.3f}"
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    return f"parity max|diff| {parity.max_abs_diff:.3g} (tolerance {parity.tolerance:.3g}){top1}; {stages}"
