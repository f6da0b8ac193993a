"""A written file judged again, as its exporter judged it, on a request's data (one function per family).

An export index (slimship.pipeline.export_index) reuses a checked file; when the release's data differs
from the data its verdict was reached on, the file is judged here by the same rule and the same cases
its exporter uses (`slimship.compare.judge_cases`, then top-1 agreement on the evaluation batches).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from slimship.exporters.common import (
    ParityReport,
    as_input_tuple,
    batches_as_tuples,
    eval_mode,
    fitting_reference,
    without_shape_guards,
)
from slimship.exporters.registry import ExportRequest, FormatRecord


def _checked(model: torch.nn.Module, dynamic: bool) -> torch.nn.Module:
    """The module a dynamic-batch file is compared with (its traced batch guard removed)."""
    return (without_shape_guards(model) or model) if dynamic else model


def _onnx(record: FormatRecord, request: ExportRequest, path: Path, dynamic: bool) -> ParityReport:
    from slimship.exporters.onnx_export import onnx_parity
    from slimship.exporters.onnx_quant import quantised_parity

    model, inputs = eval_mode(request.model), as_input_tuple(request.trace_example)
    evals = batches_as_tuples(request.eval_batches)
    if record.precision != "fp32":
        calib = batches_as_tuples(request.calibration) or [inputs]
        return quantised_parity(model, path, inputs, record.precision, calib, evals, request.example, dynamic)
    reference = fitting_reference(request.example, inputs, dynamic)
    return onnx_parity(
        _checked(model, dynamic), path, inputs, dynamic_batch=dynamic, reference_inputs=reference
    )


def _tflite(record: FormatRecord, request: ExportRequest, path: Path, dynamic: bool) -> ParityReport:
    from slimship.exporters.tflite_export import tflite_parity

    inputs = as_input_tuple(request.example)
    calib = (batches_as_tuples(request.calibration) or [inputs]) if record.precision == "int8" else []
    return tflite_parity(
        eval_mode(request.model), path, inputs, variant=record.precision, check_inputs=calib,
        eval_batches=batches_as_tuples(request.eval_batches), reference_inputs=inputs,
    )  # fmt: skip


def _executorch(record: FormatRecord, request: ExportRequest, path: Path, dynamic: bool) -> ParityReport:
    from slimship.exporters.executorch_export import executorch_parity

    inputs = as_input_tuple(request.trace_example)
    calib = (batches_as_tuples(request.calibration) or [inputs]) if record.precision == "int8" else []
    return executorch_parity(
        _checked(eval_mode(request.model), dynamic), path, inputs, variant=record.precision,
        check_inputs=calib, eval_batches=batches_as_tuples(request.eval_batches), dynamic_batch=dynamic,
        reference_inputs=fitting_reference(request.example, inputs, dynamic),
    )  # fmt: skip


#: family -> how a file of that family is judged again
JUDGES: dict[str, Callable[[FormatRecord, ExportRequest, Path, bool], ParityReport]] = {
    "onnx": _onnx,
    "tflite": _tflite,
    "executorch": _executorch,
}


def judge_file(
    record: FormatRecord, request: ExportRequest, path: Path, dynamic: bool | None
) -> ParityReport:
    """The verdict on the file at `path` (of format `record`) against `request.model` on its data."""
    return JUDGES[record.family](record, request, Path(path), bool(dynamic))
