"""ONNX export: torch.export -> torch.onnx (dynamo) -> surgery -> checker, shape inference, parity."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from slimship._util import atomic_write_bytes
from slimship._version import __version__
from slimship.compare import REL_BOUNDS
from slimship.errors import ExportError, ModelFileError, VerificationError
from slimship.exporters._common import (
    ParityReport,
    TensorSpec,
    Timings,
    as_input_tuple,
    compare_outputs,
    eval_mode,
    export_error,
    module_hash,
    nbytes_and_hash,
    open_model_runner,
    random_like,
    to_numpy,
    torch_outputs,
)
from slimship.exporters.onnx_passes import SurgeryReport, default_passes, run_surgery

log = logging.getLogger(__name__)

ONNX_FP32_REL_BOUND = REL_BOUNDS["fp32"]
_WAY_OUT_EXPORT = (
    "Way out: replace or rewrite that op in the model (a supported composition of standard ops), "
    "register an ONNX translation for it (torch.onnx custom_translation_table), or export at a higher opset."
)


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
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: ParityReport
    surgery: SurgeryReport | None
    metadata: dict[str, str]
    timings: dict[str, float]


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
) -> OnnxExport:
    """Export `model` to ONNX at `path`, simplify it, check it and verify parity with PyTorch.

    Parity runs on the example inputs, `check_inputs` (extra input tuples) and random inputs (also at
    another batch size when the batch dimension is dynamic); fp32 tolerance is
    1e-4 * max(1, max|reference|). Raises ExportError, VerificationError.
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
        proto, exporter, fallback_reason, dynamic, traced = _export_proto(
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
    report = None
    with timings.measure("surgery"):
        if surgery:
            proto, report = run_surgery(proto, default_passes(entries))
        else:
            proto, _ = run_surgery(proto, [p for p in default_passes(entries) if p.name == "add_metadata"])
    with timings.measure("check"):
        proto = _check(proto, path)
        atomic_write_bytes(path, proto.SerializeToString())
    with timings.measure("parity"):
        parity = onnx_parity(traced, path, inputs, check_inputs=check_inputs, dynamic_batch=dynamic)
    nbytes, digest = nbytes_and_hash(path)
    result = OnnxExport(
        path=path,
        bytes=nbytes,
        sha256=digest,
        opset=opset,
        exporter=exporter,
        fallback_reason=fallback_reason,
        dynamic_batch=dynamic,
        inputs=_specs(proto.graph.input, proto.graph.initializer),
        outputs=_specs(proto.graph.output, []),
        parity=parity,
        surgery=report,
        metadata=entries,
        timings=timings.stages,
    )
    if not parity.passed:
        raise VerificationError(
            f"{path}: ONNX outputs differ from PyTorch by {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.tolerance:.3g}) on cases {parity.cases}: {parity.reason}. "
            "Export with surgery=False to see whether a surgery pass or the exporter is at fault."
        )
    return result


def _check_names(names: list[str], count: int, what: str) -> None:
    if len(names) != count or len(set(names)) != len(names):
        raise ExportError(f"{what}={names}: need {count} distinct names (one per tensor)")


def _batch_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return tuple({0: batch} if t.dim() >= 1 else {} for t in inputs)


def _torch_export(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool
) -> tuple[torch.export.ExportedProgram, bool, torch.nn.Module]:
    """Export with a dynamic batch if asked and possible; also return the module that was traced."""
    if dynamic_batch:
        try:
            program = torch.export.export(model, inputs, dynamic_shapes=_batch_shapes(inputs), strict=False)
            return program, True, _without_shape_guards(model) or model  # parity at another batch
        except Exception as exc:
            unguarded = _without_shape_guards(model)
            if unguarded is not None:
                try:  # parity on another batch size (the "random_batch" case) proves this was sound
                    program = torch.export.export(
                        unguarded, inputs, dynamic_shapes=_batch_shapes(inputs), strict=False
                    )
                    return program, True, unguarded
                except Exception:
                    pass
            log.warning(
                "the model specialises its batch size (%s); exporting with a static batch of %s instead",
                str(exc).strip().splitlines()[0][:200],
                inputs[0].shape[0] if inputs and inputs[0].dim() else "?",
            )
    try:
        return torch.export.export(model, inputs, strict=False), False, model
    except Exception as exc:
        raise export_error("torch.export of the model", exc, None, _WAY_OUT_EXPORT) from exc


def _without_shape_guards(model: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of a `torch.export(...).module()` without its input-shape checks (a `_guards_fn` call in the
    graph, or the input-constraint pre-hook that `validate_inputs` switches), else None.

    Such modules guard the traced batch size; the graph itself often works for any batch (the parity
    check at another batch size proves it).
    """
    graph = getattr(model, "graph", None)
    if not isinstance(graph, torch.fx.Graph):
        return None
    guards = [
        n for n in graph.nodes if n.op == "call_module" and str(n.target) == "_guards_fn" and not n.users
    ]
    if not guards and not getattr(model, "validate_inputs", False):
        return None
    clone = copy.deepcopy(model)
    for node in [n for n in clone.graph.nodes if n.op == "call_module" and str(n.target) == "_guards_fn"]:
        clone.graph.erase_node(node)
    clone.recompile()
    if hasattr(clone, "validate_inputs"):
        clone.validate_inputs = False
    return clone


def _export_proto(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    opset: int,
    dynamic_batch: bool,
    input_names: list[str],
    output_names: list[str],
) -> tuple[onnx.ModelProto, str, str | None, bool, torch.nn.Module]:
    program, dynamic, traced = _torch_export(model, inputs, dynamic_batch)
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
        return _name_batch_dim(onnx_program.model_proto), "dynamo", None, dynamic, traced
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
        return onnx.load_from_string(buffer.getvalue()), "torchscript", str(dynamo_error), dynamic, traced
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


def _check(proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    try:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ExportError(
            f"{path}: the exported ONNX model fails onnx.checker / shape inference: {exc}. "
            "Export with surgery=False; if that passes, a surgery pass broke the graph (please report it)."
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
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        specs.append(TensorSpec(value.name, shape, dtype))
    return specs


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Load an .onnx file; a missing, corrupt or truncated file gives a ModelFileError."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p))
    except Exception as exc:
        raise ModelFileError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}); the file is corrupt or truncated"
        ) from None


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
) -> ParityReport:
    """Compare onnxruntime and PyTorch outputs on example, given and random inputs."""
    inputs = as_input_tuple(example_inputs)
    load_onnx(path)  # clear ModelFileError for a damaged file
    runner = open_model_runner(path, runtime="onnxruntime")
    cases: list[tuple[str, tuple[torch.Tensor, ...]]] = [("example", inputs)]
    cases += [(f"check_{i}", as_input_tuple(c)) for i, c in enumerate(check_inputs or [])]
    cases += [(f"random_{i}", random_like(inputs, seed=i)) for i in range(random_cases)]
    if dynamic_batch and inputs and inputs[0].dim():
        cases.append(("random_batch", random_like(inputs, seed=99, batch=inputs[0].shape[0] + 1)))
    reference = [torch_outputs(model, case) for _, case in cases]
    candidate = [_run(runner, to_numpy(case)) for _, case in cases]
    return compare_outputs(reference, candidate, [name for name, _ in cases], rel_bound)


def _run(runner, arrays: list[np.ndarray]) -> list[np.ndarray]:
    try:
        return runner.run(arrays)
    except Exception as exc:
        raise VerificationError(f"onnxruntime failed to run the exported model: {exc}") from exc


def onnx_tensor_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of an .onnx file; ModelFileError if it cannot be read."""
    model = load_onnx(path)
    return _specs(model.graph.input, model.graph.initializer), _specs(model.graph.output, [])
