"""TFLite / LiteRT export with litert-torch: fp32, fp16 weights, dynamic-range int8, full int8.

How each variant is made with what litert-torch 0.10 ships:
- fp32: `litert_torch.convert(module, args)`.
- fp16: the fp32 flatbuffer, then ai-edge-quantizer's `float_casting` weight-only recipe (16-bit float
  weights for FULLY_CONNECTED / CONV_2D / DEPTHWISE_CONV_2D / CONV_2D_TRANSPOSE / EMBEDDING_LOOKUP, with
  DEQUANTIZE ops feeding float kernels).
- int8-dynamic: PT2E with litert-torch's `PT2EQuantizer` (symmetric, per-channel, is_dynamic=True),
  converted with `QuantConfig(pt2e_quantizer=...)` -> dynamic-range int8 kernels; an embedding table the
  converter made asymmetric int8 is requantised per row, symmetric (`tflite_embedding`), so LiteRT loads it.
- int8: the same quantizer with static activation observers, calibrated on the user's batches (or the
  example inputs), -> full-integer model (int8 inputs/outputs with scale/zero point).

Parity bounds (max|diff| <= bound * max(1, max|reference|)) and top-1 minimums live in PARITY_BOUNDS.
Quantized variants are checked on in-distribution data only (example inputs, calibration and check
inputs), since activation ranges were calibrated on those; float variants also on random inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship._util import atomic_write_bytes
from slimship.compare import MAGNITUDE_CAPS, REL_BOUNDS, TOP1_MINIMUMS
from slimship.errors import ExportError, ModelFileError, VerificationError
from slimship.exporters.common import (
    Memo,
    ParityReport,
    TensorSpec,
    Timings,
    agreement_check,
    as_input_tuple,
    batches_as_tuples,
    compare_outputs,
    eval_mode,
    export_error,
    nbytes_and_hash,
    open_model_runner,
    parity_failure,
    random_like,
    to_numpy,
    torch_outputs,
    with_reference_case,
)
from slimship.exporters.pt2e_calibration import calibrate, small_ops
from slimship.exporters.tflite_compat import input_order, output_order, read_ops, tensor_specs
from slimship.exporters.tflite_embedding import symmetric_embedding_tables

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8")

# variant -> (relative bound on max|diff|, minimum top-1 agreement on eval data).
# fp16 weights keep ~3 decimal digits; int8 bounds are loose on purpose (per-tensor 8-bit activations
# on small random-init nets reach ~0.3 of the output scale), so top-1 agreement on the user's
# evaluation data is the real quality gate for the int8 variants.
#: variant -> (relative parity bound from slimship.compare.REL_BOUNDS, top-1 agreement minimum)
PARITY_BOUNDS: dict[str, tuple[float, float]] = {v: (REL_BOUNDS[v], TOP1_MINIMUMS[v]) for v in VARIANTS}

_FP16_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D_TRANSPOSE", "EMBEDDING_LOOKUP")
_WAY_OUT = (
    "Way out: rewrite that op with ops LiteRT supports (see the LiteRT op list), wrap it with "
    "litert_torch's custom-op/composite support, or export to ONNX instead."
)


@dataclasses.dataclass
class TFLiteExport:
    """A written .tflite file and how it was made and checked."""

    path: Path
    bytes: int
    sha256: str
    variant: str
    nhwc: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: dict[str, int]
    parity: ParityReport
    calibration_batches: int
    timings: dict[str, float]


def export_tflite(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    variant: str = "fp32",
    calibration: Iterable[Any] | None = None,
    nhwc: bool = False,
    check_inputs: list[Any] | None = None,
    eval_batches: Iterable[Any] | None = None,
    reference_inputs: Any = None,
) -> TFLiteExport:
    """Convert `model` to a .tflite `variant` at `path` and verify it against PyTorch.

    `calibration` / `eval_batches`: iterables of input tensors or tuples (extra items such as labels
    are ignored only when they are not tensors; pass input tuples). With `nhwc=True` every 4-D input
    is taken channel-last (N, H, W, C) by the converted model. `reference_inputs` (default: the example)
    are the inputs a release stores; `parity.record()` gives the figures on them. Raises ExportError,
    VerificationError (the file is removed).
    """
    if variant not in VARIANTS:
        raise ExportError(f"variant={variant!r} is not one of {VARIANTS}")
    path = Path(path)
    inputs = as_input_tuple(example_inputs)
    model = eval_mode(model)
    calib = batches_as_tuples(calibration) or [inputs]
    timings = Timings()
    nhwc_args = [i for i, t in enumerate(inputs) if t.dim() == 4] if nhwc else []
    if nhwc and not nhwc_args:
        raise ExportError("nhwc=True but no example input is 4-D (N, C, H, W)")

    with timings.measure("convert"), _quiet_litert():
        data = _convert(model, inputs, variant, calib, nhwc_args)
    atomic_write_bytes(path, data)
    evals = batches_as_tuples(eval_batches)
    with timings.measure("parity"), _loadable(path, variant), small_ops():
        parity = tflite_parity(
            model,
            path,
            inputs,
            variant=variant,
            nhwc_args=nhwc_args,
            check_inputs=[*(calib if variant == "int8" else []), *map(as_input_tuple, check_inputs or [])],
            eval_batches=evals,
            reference_inputs=as_input_tuple(reference_inputs) if reference_inputs is not None else inputs,
        )
    nbytes, digest = nbytes_and_hash(path)
    in_specs, out_specs = tensor_specs(path)
    result = TFLiteExport(
        path=path,
        bytes=nbytes,
        sha256=digest,
        variant=variant,
        nhwc=bool(nhwc_args),
        inputs=in_specs,
        outputs=out_specs,
        ops=read_ops(path),
        parity=parity,
        calibration_batches=len(calib) if variant == "int8" else 0,
        timings=timings.stages,
    )
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{path}: {parity_failure('TFLite', variant, parity)}")
    return result


@contextlib.contextmanager
def _loadable(path: Path, variant: str) -> Iterator[None]:
    """A converted file LiteRT itself cannot load is the converter's failure, not a damaged file."""
    try:
        yield
    except ModelFileError as exc:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{path}: litert-torch converted the model to {variant}, and LiteRT cannot load that file: "
            f"{str(exc).split('cannot be loaded (', 1)[-1].rstrip('. ')}. Way out: another precision of "
            "TFLite, or ONNX / ExecuTorch at this precision."
        ) from None


@contextlib.contextmanager
def _quiet_litert() -> Iterator[None]:
    """Hide litert-torch's console progress unless our logger is at DEBUG."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    if not log.isEnabledFor(logging.DEBUG):
        os.environ[key] = "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, *range(2, t.dim()), 1).contiguous()


def _layout(inputs: tuple[torch.Tensor, ...], nhwc_args: list[int]) -> tuple[torch.Tensor, ...]:
    return tuple(_channel_last(t) if i in nhwc_args else t for i, t in enumerate(inputs))


def _convert(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    variant: str,
    calib: list[tuple[torch.Tensor, ...]],
    nhwc_args: list[int],
) -> bytes:
    import litert_torch

    model = broadcasts_materialised(model, inputs)
    module = litert_torch.to_channel_last_io(model, args=nhwc_args) if nhwc_args else model
    args = _layout(inputs, nhwc_args)
    quant_config = None
    if variant in ("int8-dynamic", "int8"):
        module, quant_config = _pt2e_quantize(module, args, variant, [_layout(c, nhwc_args) for c in calib])
    try:
        edge = litert_torch.convert(module, args, quant_config=quant_config)
        data = bytes(edge.model_content())
    except Exception as exc:
        graph = _graph_for_errors(module, args)
        raise export_error(f"LiteRT conversion ({variant})", exc, graph, _WAY_OUT) from exc
    if variant == "fp16":
        data = _fp16_weights(data)
    if variant == "int8-dynamic":  # a decoder's embedding table, made loadable (tflite_embedding)
        data, tables = symmetric_embedding_tables(data)
        if tables:
            log.info("int8-dynamic: %d embedding table(s) requantised per row, symmetric", len(tables))
    return data


_ATEN = torch.ops.aten
#: ops that only reshape or copy a tensor (a broadcast passes through them unchanged)
_SHAPE_ONLY = frozenset({_ATEN.view.default, _ATEN.reshape.default, _ATEN._unsafe_view.default,
                         _ATEN.unsqueeze.default, _ATEN.clone.default, _ATEN.contiguous.default})  # fmt: skip
_TRANSPOSES = frozenset({_ATEN.transpose.int, _ATEN.permute.default, _ATEN.t.default})


def broadcasts_materialised(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    """`model` with each `expand` that reaches a transpose made a concatenation of copies, else `model`.

    litert-torch 0.10 converts a transpose of a broadcast wrongly (`k.expand(...).transpose(2, 3)`
    comes out with the wrong values): that is the `repeat_kv` of every grouped-query attention with a
    single key/value head, so a decoder slimmed to one KV head differs from PyTorch. Copies along the
    broadcast dimensions are the same values and convert right.
    """
    try:
        graph_module = torch.export.export(model, inputs, strict=False).module()
    except Exception:  # the conversion itself reports what fails to trace
        return model
    broadcasts = (_ATEN.expand.default, _ATEN.repeat.default)
    expands = [n for n in graph_module.graph.nodes if n.target in broadcasts and _feeds_transpose(n)]
    for node in expands:
        _as_copies(graph_module.graph, node)
    if not expands:
        return model
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def _feeds_transpose(node: torch.fx.Node) -> bool:
    users = list(node.users)
    while users:
        user = users.pop()
        if user.target in _TRANSPOSES:
            return True
        if user.target in _SHAPE_ONLY:
            users.extend(user.users)
    return False


def _as_copies(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Replace an expand or a repeat (a tiling: copies of the tensor side by side) by concatenations."""
    source, out = node.args[0], node.meta.get("val")
    shape = getattr(source, "meta", {}).get("val")
    if out is None or shape is None or not all(isinstance(d, int) for d in (*out.shape, *shape.shape)):
        return
    with graph.inserting_before(node):
        value, dims = source, list(shape.shape)
        while len(dims) < out.dim():  # both add leading dimensions
            value = graph.call_function(_ATEN.unsqueeze.default, (value, 0))
            dims.insert(0, 1)
        for dim, (size, target) in enumerate(zip(dims, out.shape, strict=True)):
            if target > size:  # expand: size 1 -> target; repeat: target // size copies
                value = graph.call_function(_ATEN.cat.default, ([value] * (target // size), dim))
    node.replace_all_uses_with(value)


def _graph_for_errors(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule | None:
    graph = getattr(module, "graph", None)
    if isinstance(graph, torch.fx.Graph):
        return module  # type: ignore[return-value]
    try:
        return torch.export.export(module, args, strict=False).graph_module
    except Exception:
        return None


def _pt2e_quantize(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    variant: str,
    calib: list[tuple[torch.Tensor, ...]],
) -> tuple[torch.nn.Module, Any]:
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    dynamic = variant == "int8-dynamic"
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    )
    try:
        traced = torch.export.export(module, args, strict=False).module()
        prepared = quantize_pt2e.prepare_pt2e(traced, quantizer)
        calibrate(prepared, calib if not dynamic else [args])
        converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    except Exception as exc:
        raise export_error(
            f"PT2E quantization ({variant})", exc, _graph_for_errors(module, args), _WAY_OUT
        ) from exc
    return converted, quant_config.QuantConfig(pt2e_quantizer=quantizer)


def _fp16_weights(fp32_model: bytes) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "fp32.tflite"
        src.write_bytes(fp32_model)
        q = quantizer.Quantizer(float_model=str(src))
        for op in _FP16_OPS:
            q.add_weight_only_config(
                regex=".*",
                operation_name=getattr(qtyping.TFLOperationName, op),
                num_bits=16,
                algorithm_key="float_casting",
            )
        try:
            result = q.quantize()
        except Exception as exc:
            raise ExportError(f"fp16 weight casting with ai-edge-quantizer failed: {exc}") from exc
    if result.quantized_model is None:
        raise ExportError("fp16 weight casting produced no model (ai-edge-quantizer returned nothing)")
    return bytes(result.quantized_model)


def tflite_parity(
    model: torch.nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    variant: str = "fp32",
    nhwc_args: list[int] | None = None,
    check_inputs: list[tuple[torch.Tensor, ...]] | None = None,
    eval_batches: list[tuple[torch.Tensor, ...]] | None = None,
    runtime: str = "litert",
    reference_inputs: tuple[torch.Tensor, ...] | None = None,
) -> ParityReport:
    """Compare a .tflite file with PyTorch on the same inputs (NHWC-transposed for `nhwc_args`) by the
    one verdict (`slimship.compare.judge_cases`, then top-1 agreement on `eval_batches`)."""
    inputs = as_input_tuple(example_inputs)
    nhwc_args = nhwc_args or []
    rel_bound, _ = PARITY_BOUNDS[variant]
    runner = open_model_runner(path, runtime=runtime)
    cases = [("example", inputs)] + [(f"check_{i}", c) for i, c in enumerate(check_inputs or [])]
    if variant in ("fp32", "fp16"):
        cases += [(f"random_{i}", random_like(inputs, seed=i)) for i in range(2)]
    cases, reference_case = with_reference_case(cases, reference_inputs)
    torch_run = Memo(lambda case: torch_outputs(model, case))
    file_run = Memo(lambda case: run_tflite(runner, to_numpy(_layout(case, nhwc_args))))
    reference, candidate = [torch_run(c) for _, c in cases], [file_run(c) for _, c in cases]
    cap = MAGNITUDE_CAPS[variant]
    report = compare_outputs(reference, candidate, [n for n, _ in cases], rel_bound, cap)
    report.reference_case = reference_case
    if eval_batches:
        ref_eval, cand_eval = [torch_run(b) for b in eval_batches], [file_run(b) for b in eval_batches]
        agreement_check(report, variant, ref_eval, cand_eval)
    return report


def run_tflite(runner, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Run a TFLite runner with inputs in signature-argument order (args_0, args_1 ...)."""
    order = _arg_order(runner)
    feed = [arrays[i] for i in order] if order else arrays
    try:
        outputs = runner.run(feed)
    except Exception as exc:
        raise VerificationError(f"the TFLite interpreter failed to run the model: {exc}") from exc
    out_order = output_order([d["name"] for d in getattr(runner, "outputs", [])])
    return [outputs[out_order.index(i)] for i in range(len(outputs))] if out_order else outputs


def _arg_order(runner) -> list[int] | None:
    """Map interpreter input positions to argument indices when the names say (…args_<i>)."""
    return input_order([d["name"] for d in getattr(runner, "inputs", [])])
