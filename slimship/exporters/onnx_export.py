"""ONNX export: torch.export -> torch.onnx (dynamo) -> surgery -> checker, shape inference, parity."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import torch

from slimship._util import atomic_write_bytes
from slimship._version import __version__
from slimship.compare import REL_BOUNDS
from slimship.errors import ExportError, VerificationError, first_line
from slimship.exporters.common import (
    ParityReport,
    TensorSpec,
    Timings,
    as_input_tuple,
    compare_outputs,
    eval_mode,
    export_error,
    fitting_reference,
    module_hash,
    nbytes_and_hash,
    open_model_runner,
    random_like,
    to_numpy,
    torch_outputs,
    with_reference_case,
    without_shape_guards,
)
from slimship.exporters.onnx_load import load_onnx
from slimship.exporters.onnx_passes import AddMetadata, Pass, SurgeryReport, default_passes, run_surgery

log = logging.getLogger(__name__)

ONNX_FP32_REL_BOUND = REL_BOUNDS["fp32"]
SURGERY_REL_BOUND = 1e-5  # a surgery pass must keep the graph's outputs to this, relative to max(1, |y|)
_WAY_OUT_EXPORT = (
    "Way out: replace or rewrite that op in the model (a supported composition of standard ops), "
    "register an ONNX translation for it (torch.onnx custom_translation_table), or export at a higher opset."
)


@dataclasses.dataclass
class SkippedPass:
    """A surgery pass left out for one model because the graph after it failed a check."""

    name: str
    reason: str


@dataclasses.dataclass
class OnnxExport:
    """A written .onnx file and how it was made and checked."""

    path: Path
    bytes: int
    sha256: str
    opset: int
    exporter: str  # "dynamo" or "torchscript" (fallback)
    fallback_reason: str | None
    dynamic_batch: bool
    dynamic_batch_reason: str | None  # why the batch is static (None when it is dynamic)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: ParityReport
    surgery: SurgeryReport | None
    metadata: dict[str, str]
    timings: dict[str, float]
    skipped_passes: list[SkippedPass] = dataclasses.field(default_factory=list)
    precision: str = "fp32"  # fp16, int8-dynamic, int8: slimship.exporters.onnx_quant
    calibration_batches: int = 0


class ParityInputs(NamedTuple):
    """What the PyTorch parity check of a written file needs."""

    traced: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    check_inputs: list[Any] | None
    dynamic: bool
    reference_inputs: tuple[torch.Tensor, ...] | None = None


def default_names(prefix: str, count: int) -> list[str]:
    """`input`, `input_1`, `input_2` ... (same for outputs)."""
    return [prefix if i == 0 else f"{prefix}_{i}" for i in range(count)]


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset: int = 18,
    metadata: dict[str, str] | None = None,
    surgery: bool = True,
    check_inputs: list[Any] | None = None,
    reference_inputs: Any = None,
) -> OnnxExport:
    """Export `model` to ONNX at `path`, simplify it, check it and verify parity with PyTorch.

    Parity runs on the example inputs, `check_inputs` (extra input tuples) and random inputs (also at
    another batch size when the batch dimension is dynamic) and `reference_inputs` (the inputs a release
    stores: `parity.record()`); fp32 tolerance is 1e-4 * max(1, max|reference|) per case. A surgery
    pass after which the graph fails the checker or differs from
    the graph before surgery is left out (logged, listed in `skipped_passes`). Raises ExportError,
    VerificationError.
    """
    if opset < 18:
        raise ExportError(f"opset={opset}: the dynamo exporter needs opset >= 18; pass opset=18 or higher")
    path = Path(path)
    inputs = as_input_tuple(example_inputs)
    model = eval_mode(model)
    timings = Timings()
    reference_outputs = torch_outputs(model, inputs)
    input_names = list(input_names) if input_names else default_names("input", len(inputs))
    output_names = list(output_names) if output_names else default_names("output", len(reference_outputs))
    _check_names(input_names, len(inputs), "input_names")
    _check_names(output_names, len(reference_outputs), "output_names")

    with timings.measure("export"):
        proto, exporter, fallback_reason, (dynamic, static_reason), traced = _export_proto(
            model, inputs, opset, dynamic_batch, input_names, output_names
        )
    entries = {
        "slimship_version": __version__,
        "source_model_sha256": module_hash(model),
        **{
            str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
            for k, v in (metadata or {}).items()
        },
    }
    exported = proto
    report, skipped = None, []
    with timings.measure("surgery"):
        if surgery:
            cases = surgery_cases(inputs, dynamic)
            proto, report, skipped = checked_surgery(proto, default_passes(entries), cases)
        else:
            proto = _metadata_only(exported, entries)
    reference = fitting_reference(reference_inputs, inputs, dynamic)
    verify = ParityInputs(traced, inputs, check_inputs, dynamic, reference)
    if report is None:
        proto, parity = _write_and_verify(proto, path, verify, timings)
    else:
        proto, parity, problem = _write_surgered(proto, path, verify, timings)
        if problem is not None:  # rare, surgery passed its own checks: export without it
            log.warning("the ONNX graph after surgery fails (%s); exporting it without surgery", problem)
            skipped += [
                SkippedPass(k, problem) for k, n in report.changes.items() if n and k != AddMetadata.name
            ]
            report = None
            proto, parity = _write_and_verify(_metadata_only(exported, entries), path, verify, timings)
    nbytes, digest = nbytes_and_hash(path)
    result = OnnxExport(
        path=path,
        bytes=nbytes,
        sha256=digest,
        opset=opset,
        exporter=exporter,
        fallback_reason=fallback_reason,
        dynamic_batch=dynamic,
        dynamic_batch_reason=static_reason,
        inputs=_specs(proto.graph.input, proto.graph.initializer),
        outputs=_specs(proto.graph.output, []),
        parity=parity,
        surgery=report,
        metadata=entries,
        timings=timings.stages,
        skipped_passes=skipped,
    )
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise VerificationError(
            f"{path}: ONNX outputs differ from PyTorch by {parity.max_abs_diff:.3g} "
            f"(> tolerance {parity.tolerance:.3g}) on cases {parity.cases}, without surgery too: "
            f"{parity.reason}. The exporter is at fault: please report it; TFLite may work meanwhile."
        )
    return result


def _metadata_only(proto: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    return run_surgery(proto, [AddMetadata(entries)])[0]


def _write_surgered(
    proto: onnx.ModelProto, path: Path, verify: ParityInputs, timings: Timings
) -> tuple[onnx.ModelProto, ParityReport | None, str | None]:
    """`_write_and_verify` for a graph after surgery: (graph, parity, None), or what is wrong with it."""
    try:
        proto, parity = _write_and_verify(proto, path, verify, timings)
    except (ExportError, VerificationError) as exc:
        return proto, None, str(exc)
    if parity.passed:
        return proto, parity, None
    path.unlink(missing_ok=True)
    diff = f"{parity.max_abs_diff:.3g} (> tolerance {parity.tolerance:.3g})"
    return proto, parity, f"PyTorch parity: outputs differ by {diff} on cases {parity.cases}"


def _write_and_verify(
    proto: onnx.ModelProto, path: Path, verify: ParityInputs, timings: Timings
) -> tuple[onnx.ModelProto, ParityReport]:
    """Check the graph, write it to `path` and compare it with PyTorch; remove the file on an error."""
    with timings.measure("check"):
        proto = _check(proto, path)
        atomic_write_bytes(path, proto.SerializeToString())
    try:
        with timings.measure("parity"):
            parity = onnx_parity(
                verify.traced,
                path,
                verify.inputs,
                check_inputs=verify.check_inputs,
                dynamic_batch=verify.dynamic,
                reference_inputs=verify.reference_inputs,
            )
    except Exception:  # onnxruntime cannot run it: leave no file behind
        path.unlink(missing_ok=True)
        raise
    return proto, parity


def _check_names(names: list[str], count: int, what: str) -> None:
    if len(names) != count or len(set(names)) != len(names):
        raise ExportError(f"{what}={names}: need {count} distinct names (one per tensor)")


def _batch_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return tuple({0: batch} if t.dim() >= 1 else {} for t in inputs)


Batch = tuple[bool, str | None]  # dynamic?, and why not


def _torch_export(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[torch.export.ExportedProgram, Batch, torch.nn.Module]:
    """Export with a dynamic batch if asked and possible; also return the module that was traced."""
    reason = "a static batch was asked for (dynamic_batch=False)"
    if dynamic_batch and not any(t.dim() for t in inputs):
        dynamic_batch, reason = False, "no input has a batch dimension"
    if dynamic_batch:
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=_batch_shapes(inputs), strict=False)
            return program, (True, None), without_shape_guards(model) or model  # parity at another batch
        except Exception as exc:
            unguarded = without_shape_guards(model)
            if unguarded is not None:
                try:  # parity on another batch size (the "random_batch" case) proves this was sound
                    program = torch.export.export(
                        unguarded, inputs, dynamic_shapes=_batch_shapes(inputs), strict=False
                    )
                    return program, (True, None), unguarded
                except Exception:
                    pass
            reason = saved_static_batch(model) or specialisation_reason(exc)
            log.warning(
                "ONNX export keeps a static batch of %s: %s",
                inputs[0].shape[0] if inputs[0].dim() else "?",
                reason,
            )
    try:
        return torch.export.export(model, inputs, strict=False), (False, reason), model
    except Exception as exc:
        raise export_error("torch.export of the model", exc, None, _WAY_OUT_EXPORT) from exc


def saved_static_batch(model: torch.nn.Module) -> str | None:
    """Why the batch is static when `model` is a saved program's graph (``ExportedProgram.module()``) whose
    inputs all have a fixed first dim: it was exported without dynamic_shapes; None for anything else."""
    if not isinstance(model, torch.fx.GraphModule):
        return None
    inputs = [n for n in model.graph.nodes if n.op == "placeholder"]
    vals = [(n.name, n.meta.get("val")) for n in inputs]
    tensors = [(name, v) for name, v in vals if isinstance(v, torch.Tensor) and v.dim()]  # batched ones
    if not tensors or any(isinstance(v.shape[0], torch.SymInt) for _, v in tensors):
        return None
    per_input = ", ".join("{0: batch}" if v.dim() else "{}" for _, v in vals if isinstance(v, torch.Tensor))
    fixed = int(tensors[0][1].shape[0])
    return (
        f"the program was saved without dynamic_shapes (its batch is fixed at {fixed}): export it with "
        f"batch = Dim('batch'); torch.export.export(model, args, dynamic_shapes=({per_input},))"
    )


def specialisation_reason(exc: BaseException) -> str:
    """One line saying why torch.export refused a dynamic batch."""
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    line = next((x for x in lines if "specialized" in x), lines[0] if lines else type(exc).__name__)
    constant = re.search(r"specialized it to be a constant \((\d+)\)", line)
    if constant:
        return (
            f"the model fixes the batch size to {constant.group(1)} (a literal batch, or int() of a shape, "
            "in a reshape/view or shape check; write -1 or x.shape[0] there to keep the batch dynamic)"
        )
    return f"torch.export cannot keep the batch dynamic: {line[:200]}"


def _export_proto(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    opset: int,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
) -> tuple[onnx.ModelProto, str, str | None, Batch, torch.nn.Module]:
    program, batch, traced = _torch_export(model, inputs, dynamic_batch)
    dynamic = batch[0]
    try:
        onnx_program = torch.onnx.export(
            program,
            inputs,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            external_data=False,
            verbose=False,
        )
        return _name_batch_dim(onnx_program.model_proto), "dynamo", None, batch, traced
    except Exception as exc:
        dynamo_error = export_error("ONNX export (dynamo)", exc, program.graph_module, _WAY_OUT_EXPORT)
    log.warning("dynamo ONNX export failed, falling back to the TorchScript exporter: %s", dynamo_error)
    try:
        buffer = io.BytesIO()
        torch.onnx.export(
            model,
            inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={n: {0: "batch"} for n in input_names + output_names} if dynamic else None,
        )
        return onnx.load_from_string(buffer.getvalue()), "torchscript", str(dynamo_error), batch, traced
    except Exception as exc:
        log.debug("TorchScript exporter failed too: %s", exc)
        raise dynamo_error from exc


def _name_batch_dim(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rename the exporter's symbol for the batch dimension (e.g. `s77`) to `batch`."""
    symbols = {
        v.type.tensor_type.shape.dim[0].dim_param
        for v in proto.graph.input
        if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param
    }
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = "batch"
    return proto


# ---------------------------------------------------------------- surgery, one pass at a time if need be


def checked_surgery(
    proto: onnx.ModelProto, passes: list[Pass], cases: dict[str, list[np.ndarray]]
) -> tuple[onnx.ModelProto, SurgeryReport, list[SkippedPass]]:
    """Run the surgery passes and check the result against the graph before surgery on input `cases`.

    When the result fails the checker, cannot run or differs, the passes are added back one at a time
    and each one after which the graph fails is left out (warning + SkippedPass). A sound pipeline costs
    one surgery, one checker call and two onnxruntime sessions.
    """
    baseline = _baseline_outputs(proto, cases)
    result, problem = _try_surgery(proto, passes, cases, baseline)
    if problem is None:
        return (*result, [])
    log.warning("ONNX surgery broke the graph (%s); checking its passes one at a time", problem)
    kept: list[Pass] = []
    skipped: list[SkippedPass] = []
    for p in passes:
        candidate, problem = _try_surgery(proto, [*kept, p], cases, baseline)
        if problem is None:
            kept.append(p)
            result = candidate
        else:
            log.warning("ONNX surgery pass %r left out for this model: %s", p.name, problem)
            skipped.append(SkippedPass(p.name, problem))
    if not kept:
        result = run_surgery(proto, [])
    return (*result, skipped)


Outputs = list[list[np.ndarray]]  # per case, per output


def _try_surgery(
    proto: onnx.ModelProto, passes: list[Pass], cases: dict[str, list[np.ndarray]], baseline: Outputs | None
) -> tuple[tuple[onnx.ModelProto, SurgeryReport] | None, str | None]:
    """(surgery result, None) when the result is sound, else (None or the result, what is wrong)."""
    try:
        result = run_surgery(proto, passes)
    except ExportError as exc:
        return None, str(exc)
    return result, surgery_problem(result[0], cases, baseline)


def surgery_problem(
    model: onnx.ModelProto, cases: dict[str, list[np.ndarray]], baseline: Outputs | None
) -> str | None:
    """What is wrong with a graph after surgery (checker, shape inference, onnxruntime, parity), or None."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        return f"onnx.checker / shape inference: {first_line(exc)}"
    if baseline is None:  # the graph before surgery does not run either: only the final parity can judge
        return None
    try:
        outputs = ort_outputs(model, list(cases.values()))
    except Exception as exc:
        return f"onnxruntime cannot run it: {first_line(exc)}"
    parity = compare_outputs(baseline, outputs, list(cases), SURGERY_REL_BOUND)
    if parity.passed:
        return None
    return (
        f"outputs differ from the graph before surgery by {parity.max_abs_diff:.3g} "
        f"(> tolerance {parity.tolerance:.3g})"
    )


def _baseline_outputs(proto: onnx.ModelProto, cases: dict[str, list[np.ndarray]]) -> Outputs | None:
    try:
        return ort_outputs(proto, list(cases.values()))
    except Exception as exc:
        log.debug("the exported graph does not run before surgery either: %s", exc)
        return None


def surgery_cases(inputs: tuple[torch.Tensor, ...], dynamic: bool) -> dict[str, list[np.ndarray]]:
    """The example inputs, and with a dynamic batch also another batch size (a pass must not fix it)."""
    cases = {"example": to_numpy(inputs)}
    if dynamic and inputs and inputs[0].dim():
        cases["other_batch"] = to_numpy(random_like(inputs, seed=98, batch=inputs[0].shape[0] + 1))
    return cases


def ort_outputs(model: onnx.ModelProto, cases: list[list[np.ndarray]]) -> Outputs:
    """Run an in-memory ONNX model on CPU on each case (quietly: failures are the caller's to report)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [list(session.run(None, dict(zip(names, feeds, strict=True)))) for feeds in cases]


def _check(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(
            f"{path}: the exported ONNX model fails onnx.checker / shape inference: {exc}. "
            "Surgery is dropped when it is at fault, so the exporter made this graph: try another opset, "
            "and please report it."
        ) from exc


def _specs(values, initializers) -> list[TensorSpec]:
    init_names = {i.name for i in initializers}
    specs = []
    for value in values:
        if value.name in init_names:
            continue
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
        ]
        specs.append(TensorSpec(value.name, shape, _dtype_name(tensor_type.elem_type)))
    return specs


def _dtype_name(elem_type: int) -> str:
    """The numpy name of an ONNX element type; ONNX's own name (lower case) for one numpy cannot hold as a
    plain number (string, bfloat16) or does not know ('undefined')."""
    if elem_type == onnx.TensorProto.STRING:
        return "string"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        known = elem_type in onnx.TensorProto.DataType.values()
        return onnx.TensorProto.DataType.Name(elem_type).lower() if known else f"undefined ({elem_type})"


_QUANTIZED_OPS = frozenset({"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QLinearAdd"})


def onnx_precision(path: str | Path) -> str:
    """The precision of an .onnx file, read from its initializers (a key of `slimship.compare.REL_BOUNDS`).

    int8 with QuantizeLinear / QLinear* ops (static quantization), int8-dynamic with int8/uint8
    initializers otherwise, fp16 with float16 initializers, fp32 otherwise.
    """
    proto = onnx.load(str(path), load_external_data=False)
    kinds = {t.data_type for t in proto.graph.initializer}
    if kinds & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
        static = any(node.op_type in _QUANTIZED_OPS for node in proto.graph.node)
        return "int8" if static else "int8-dynamic"
    return "fp16" if onnx.TensorProto.FLOAT16 in kinds else "fp32"


def onnx_parity(
    model: torch.nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    check_inputs: list[Any] | None = None,
    dynamic_batch: bool = False,
    rel_bound: float = ONNX_FP32_REL_BOUND,
    random_cases: int = 2,
    reference_inputs: tuple[torch.Tensor, ...] | None = None,
    cap: float | None = None,
) -> ParityReport:
    """Compare onnxruntime and PyTorch outputs on example, given, random and the release's reference inputs
    (each case by its own scale: `slimship.compare.judge_cases`)."""
    inputs = as_input_tuple(example_inputs)
    load_onnx(path)  # clear ModelFileError for a damaged file
    runner = open_model_runner(path, runtime="onnxruntime")
    cases: list[tuple[str, tuple[torch.Tensor, ...]]] = [("example", inputs)]
    cases += [(f"check_{i}", as_input_tuple(c)) for i, c in enumerate(check_inputs or [])]
    cases += [(f"random_{i}", random_like(inputs, seed=i)) for i in range(random_cases)]
    if dynamic_batch and inputs and inputs[0].dim():
        cases.append(("random_batch", random_like(inputs, seed=99, batch=inputs[0].shape[0] + 1)))
    cases, reference_case = with_reference_case(cases, reference_inputs)
    reference = [torch_outputs(model, case) for _, case in cases]
    candidate = [_run(runner, to_numpy(case)) for _, case in cases]
    report = compare_outputs(reference, candidate, [name for name, _ in cases], rel_bound, cap)
    report.reference_case = reference_case
    return report


def _run(runner, arrays: list[np.ndarray]) -> list[np.ndarray]:
    try:
        return runner.run(arrays)
    except Exception as exc:
        raise VerificationError(f"onnxruntime failed to run the exported model: {exc}") from exc


def onnx_tensor_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an .onnx file; ModelFileError if it cannot be read."""
    model = load_onnx(path)
    return _specs(model.graph.input, model.graph.initializer), _specs(model.graph.output, [])
