"""ONNX at reduced precision: fp16, dynamic-range int8 and static int8 (QDQ), checked against PyTorch.

Each variant starts from the checked fp32 export (`export_onnx`, surgery included), then:
- fp16: onnxruntime's `convert_float_to_float16`, keeping float32 inputs and outputs (Cast at the edges);
- int8-dynamic: `onnxruntime.quantization.quantize_dynamic`, int8 per-channel weights, activations
  quantised at run time (MatMulInteger / ConvInteger);
- int8: `quantize_static` in QDQ form (QuantizeLinear / DequantizeLinear pairs: what NPU execution
  providers consume), int8 per-channel weights, int8 activations calibrated (min/max) on the
  calibration batches (the user's --calibration or the data factory, like tflite-int8).

Every file is judged by the one verdict (`slimship.compare.judge_cases` with the precision's bounds, each
case on its own scale, then top-1 agreement on the evaluation batches); quantised variants are checked on
in-distribution inputs only (example, calibration, reference), fp16 on random inputs too.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from slimship._util import atomic_write_bytes
from slimship.compare import bounds
from slimship.errors import ExportError, VerificationError, first_line
from slimship.exporters.common import (
    ParityReport,
    Timings,
    agreement_check,
    as_input_tuple,
    batches_as_tuples,
    eval_mode,
    fitting_reference,
    nbytes_and_hash,
    open_model_runner,
    parity_failure,
    to_numpy,
    torch_outputs,
    without_shape_guards,
)
from slimship.exporters.onnx_export import OnnxExport, export_onnx, onnx_parity, onnx_tensor_specs
from slimship.exporters.pt2e_calibration import small_ops

VARIANTS = ("fp16", "int8-dynamic", "int8")


def export_onnx_quantised(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    variant: str,
    calibration: Iterable[Any] | None = None,
    eval_batches: Iterable[Any] | None = None,
    dynamic_batch: bool = True,
    output_names: list[str] | None = None,
    reference_inputs: Any = None,
) -> OnnxExport:
    """Export `model` to an ONNX file of `variant` (fp16, int8-dynamic, int8) at `path` and verify it.

    Raises ExportError (export or quantisation failed) or VerificationError (the verdict failed; the file
    is removed)."""
    if variant not in VARIANTS:
        raise ExportError(f"ONNX variant={variant!r} is not one of {VARIANTS}")
    path = Path(path)
    inputs = as_input_tuple(example_inputs)
    model = eval_mode(model)
    calib = batches_as_tuples(calibration) or [inputs]
    timings = Timings()
    with tempfile.TemporaryDirectory(prefix="slimship-onnxq-") as tmp:
        base = export_onnx(model, inputs, Path(tmp) / "fp32.onnx", dynamic_batch=dynamic_batch,
                           output_names=output_names)  # fmt: skip
        with timings.measure("quantize"):
            data = _QUANTISERS[variant](base.path, calib, [s.name for s in base.inputs], Path(tmp))
    atomic_write_bytes(path, data)
    try:
        with timings.measure("parity"), small_ops():
            parity = quantised_parity(model, path, inputs, variant, calib, batches_as_tuples(eval_batches),
                                      reference_inputs, base.dynamic_batch)  # fmt: skip
    except Exception:
        path.unlink(missing_ok=True)
        raise
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{path}: {parity_failure('ONNX', variant, parity)}")
    nbytes, digest = nbytes_and_hash(path)
    in_specs, out_specs = onnx_tensor_specs(path)
    return dataclasses.replace(
        base, path=path, bytes=nbytes, sha256=digest, inputs=in_specs, outputs=out_specs, parity=parity,
        timings={**{f"fp32 {k}": v for k, v in base.timings.items()}, **timings.stages}, precision=variant,
        calibration_batches=len(calib) if variant == "int8" else 0,
    )  # fmt: skip


def quantised_parity(model, path, inputs, variant, calib, evals, reference_inputs, dynamic) -> ParityReport:
    """The verdict on a quantised ONNX file: parity on the example and (quantised) calibration inputs,
    then top-1 agreement on `evals`."""
    rel_bound, cap = bounds(variant)
    reference = fitting_reference(reference_inputs, inputs, dynamic)
    checked = (without_shape_guards(model) or model) if dynamic else model
    floating = variant == "fp16"
    report = onnx_parity(
        checked, path, inputs, check_inputs=[] if floating else calib, dynamic_batch=dynamic and floating,
        rel_bound=rel_bound, cap=cap, random_cases=2 if floating else 0, reference_inputs=reference,
    )  # fmt: skip
    if evals:
        runner = open_model_runner(path, runtime="onnxruntime")
        candidate = [[np.asarray(o) for o in runner.run(to_numpy(batch))] for batch in evals]
        agreement_check(report, variant, [torch_outputs(checked, b) for b in evals], candidate)
    return report


# ------------------------------------------------------------------------------------------ quantisers


def _fp16(fp32: Path, calib: list, names: list[str], tmp: Path) -> bytes:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        proto = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    except Exception as exc:
        raise ExportError(f"ONNX fp16 conversion failed: {first_line(exc)}") from exc
    return proto.SerializeToString()


def _int8_dynamic(fp32: Path, calib: list, names: list[str], tmp: Path) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "int8-dynamic.onnx"
    try:
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)
    except Exception as exc:
        raise ExportError(f"ONNX dynamic int8 quantization failed: {first_line(exc)}") from exc
    return out.read_bytes()


def _int8_static(fp32: Path, calib: list, names: list[str], tmp: Path) -> bytes:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    out = tmp / "int8.onnx"
    try:
        quantize_static(
            str(fp32), str(out), _Batches(names, calib), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )  # fmt: skip
    except Exception as exc:
        raise ExportError(f"ONNX static int8 (QDQ) quantization failed: {first_line(exc)}") from exc
    return out.read_bytes()


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over the calibration batches."""

    def __init__(self, names: list[str], batches: list[tuple[torch.Tensor, ...]]) -> None:
        self._feeds = iter([dict(zip(names, to_numpy(b), strict=True)) for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


_QUANTISERS = {"fp16": _fp16, "int8-dynamic": _int8_dynamic, "int8": _int8_static}
