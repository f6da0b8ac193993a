"""ExecuTorch export: a `.pte` program with the XNNPACK delegate, fp32 or int8, checked against PyTorch.

How each variant is made with what executorch 1.5 ships:
- fp32: `torch.export` -> `to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`
  -> `.to_executorch()`; the XNNPACK delegate takes every op it supports, the portable kernels the rest.
- int8: PT2E with ExecuTorch's `XNNPACKQuantizer` (symmetric, per-channel weights, static activations)
  calibrated on the user's batches (or the example inputs), then lowered the same way.

A dynamic batch is kept when the traced example has a batch of 2 or more (ExecuTorch plans memory for
the upper bound `MAX_BATCH`); otherwise, or when the model does not allow it, the batch is fixed and the
reason is logged. Parity bounds follow the TFLite ones (`PARITY_BOUNDS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimship._util import atomic_write_bytes
from slimship.compare import MAGNITUDE_CAPS, REL_BOUNDS, TOP1_MINIMUMS
from slimship.errors import ExportError, VerificationError, first_line
from slimship.exporters.common import (
    Memo,
    ParityReport,
    Timings,
    agreement_check,
    as_input_tuple,
    batches_as_tuples,
    compare_outputs,
    eval_mode,
    export_error,
    fitting_reference,
    nbytes_and_hash,
    open_model_runner,
    parity_failure,
    random_like,
    to_numpy,
    torch_outputs,
    with_reference_case,
    without_shape_guards,
)
from slimship.exporters.pt2e_calibration import calibrate, small_ops

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "int8")
TOP1_MIN = {v: TOP1_MINIMUMS[v] for v in VARIANTS}
MAX_BATCH = 64

# variant -> (relative bound on max|diff|, minimum top-1 agreement on evaluation data); as for TFLite,
# the int8 bound is loose on purpose and top-1 agreement on the user's data is the real check.
PARITY_BOUNDS: dict[str, tuple[float, float]] = {v: (REL_BOUNDS[v], TOP1_MIN[v]) for v in VARIANTS}

_WAY_OUT = (
    "Way out: rewrite that op with ops ExecuTorch's portable kernels or XNNPACK support, or export to "
    "ONNX / TFLite instead."
)


@dataclasses.dataclass
class ExecuTorchExport:
    """A written .pte file and how it was made and checked."""

    path: Path
    bytes: int
    sha256: str
    variant: str
    dynamic_batch: bool
    delegated_ops: int
    portable_ops: int
    parity: ParityReport
    calibration_batches: int
    timings: dict[str, float]
    notes: list[str] = dataclasses.field(default_factory=list)


def executorch_available() -> bool:
    """True when the optional `executorch` package (slimship[executorch]) can be imported."""
    try:
        import executorch.exir  # noqa: F401
    except ImportError:
        return False
    return True


def export_executorch(
    model: torch.nn.Module,
    example_inputs: Any,
    path: str | Path,
    *,
    variant: str = "fp32",
    calibration: Iterable[Any] | None = None,
    eval_batches: Iterable[Any] | None = None,
    dynamic_batch: bool = True,
    reference_inputs: Any = None,
) -> ExecuTorchExport:
    """Lower `model` to an ExecuTorch program at `path` (XNNPACK delegate) and verify it against PyTorch.

    `reference_inputs`: the inputs a release stores (checked too when the program's batch allows them;
    `parity.record()` gives the figures on them). Raises ExportError (lowering failed, executorch
    missing) or VerificationError (parity failed; the file is removed).
    """
    if variant not in VARIANTS:
        raise ExportError(f"ExecuTorch variant={variant!r} is not one of {VARIANTS}")
    if not executorch_available():
        raise ExportError(
            "ExecuTorch export needs the optional 'executorch' package: pip install 'slimship[executorch]'"
        )
    path = Path(path)
    inputs = as_input_tuple(example_inputs)
    model = eval_mode(model)
    calib = batches_as_tuples(calibration) or [inputs]
    timings, notes = Timings(), []
    with timings.measure("trace"):
        program, dynamic = _trace(model, inputs, dynamic_batch, notes)
    with timings.measure("lower"), _quiet_executorch():
        data, delegated, portable, dynamic = _lowered(model, program, inputs, calib, variant, dynamic, notes)
    atomic_write_bytes(path, data)
    with timings.measure("parity"), small_ops():
        reference = (without_shape_guards(model) or model) if dynamic else model  # checked at batch 3 too
        parity = executorch_parity(
            reference, path, inputs, variant=variant, check_inputs=calib if variant == "int8" else [],
            eval_batches=batches_as_tuples(eval_batches), dynamic_batch=dynamic,
            reference_inputs=fitting_reference(reference_inputs, inputs, dynamic),
        )  # fmt: skip
    nbytes, digest = nbytes_and_hash(path)
    result = ExecuTorchExport(
        path=path, bytes=nbytes, sha256=digest, variant=variant, dynamic_batch=dynamic,
        delegated_ops=delegated, portable_ops=portable, parity=parity,
        calibration_batches=len(calib) if variant == "int8" else 0, timings=timings.stages, notes=notes,
    )  # fmt: skip
    if not parity.passed:
        path.unlink(missing_ok=True)
        raise VerificationError(f"{path}: {parity_failure('ExecuTorch', variant, parity)}")
    return result


def _trace(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, notes: list[str]
) -> tuple[torch.export.ExportedProgram, bool]:
    """torch.export with a dynamic batch where the example and the model allow it, else a fixed one."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() else 0
    if dynamic_batch and batch >= 2 and all(t.dim() and t.shape[0] == batch for t in inputs):
        dim = torch.export.Dim("batch", min=1, max=max(MAX_BATCH, batch))
        shapes = tuple({0: dim} for _ in inputs)
        try:
            return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False), True
        except Exception as exc:  # the model fixes its batch somewhere (a view with a literal size ...)
            unguarded = without_shape_guards(model)  # a loaded program's own batch guard, not its graph
            if unguarded is not None:
                with contextlib.suppress(Exception):  # parity at batch 3 proves the graph sound
                    return torch.export.export(unguarded, inputs, dynamic_shapes=shapes, strict=False), True
            first = first_line(exc, 200)
            notes.append(f"batch fixed to {batch}: the model does not allow a dynamic batch ({first})")
    elif dynamic_batch:
        notes.append(f"batch fixed to {batch}: a dynamic batch needs an example batch of 2 or more")
    for note in notes:
        log.info("ExecuTorch export: %s", note)
    try:
        return torch.export.export(model, inputs, strict=False), False
    except Exception as exc:
        raise export_error("torch.export (for ExecuTorch)", exc, None, _WAY_OUT) from exc


def _quantize(
    model: torch.nn.Module,
    program: torch.export.ExportedProgram,
    inputs: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]],
    dynamic: bool,
) -> torch.export.ExportedProgram:
    """PT2E static int8 with the XNNPACK quantizer, calibrated on `calib`, re-exported for lowering."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _xnnpack_quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    try:
        prepared = prepare_pt2e(program.module(), quantizer)
        calibrate(prepared, calib)
        converted = convert_pt2e(prepared)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        shapes = tuple({0: batch} for _ in inputs) if dynamic else None
        return torch.export.export(converted, inputs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        stage = "PT2E quantization (ExecuTorch int8)"
        raise export_error(stage, exc, program.graph_module, _WAY_OUT) from exc


def _lowered(
    model: torch.nn.Module, program: torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
    calib: list[tuple[torch.Tensor, ...]], variant: str, dynamic: bool, notes: list[str],
) -> tuple[bytes, int, int, bool]:  # fmt: skip
    """Quantise (int8) and lower; a dynamic-batch program ExecuTorch cannot lower (GPT-2: a view its memory
    planner sees as static on a dynamic base) is lowered again with the example's batch fixed (noted)."""
    try:
        if variant == "int8":
            program = _quantize(model, program, inputs, calib, dynamic)
        return (*_lower(program, model, inputs), dynamic)
    except ExportError as exc:
        if not dynamic:
            raise
        notes.append(f"batch fixed to {inputs[0].shape[0]}: ExecuTorch cannot lower the model with a dynamic "
                     f"batch ({first_line(exc.__cause__ or exc, 200)})")  # fmt: skip
        log.info("ExecuTorch export: %s", notes[-1])
    program = torch.export.export(model, inputs, strict=False)
    if variant == "int8":
        program = _quantize(model, program, inputs, calib, False)
    return (*_lower(program, model, inputs), False)


def _xnnpack_quantizer() -> Any:
    """ExecuTorch's XNNPACKQuantizer, keeping integer arithmetic integer.

    Its `transform_for_annotation` turns every scalar of an `aten.add` / `aten.mul` into a float32
    tensor constant, integer ones included: `positions = arange(n) + 0` (every Hugging Face decoder's
    position ids) becomes float and the `aten.index` it feeds fails ("tensors used as indices must be
    long ..."). This subclass puts the scalar back where the node's result is not floating point.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer

    class IntegerSafeQuantizer(XNNPACKQuantizer):
        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            model = super().transform_for_annotation(model)
            return integer_scalars_restored(model)

    return IntegerSafeQuantizer()


def integer_scalars_restored(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Replace the tensor-constant operands XNNPACKQuantizer gave integer add/mul nodes by their scalars."""
    changed = False
    for node in model.graph.nodes:
        value = node.meta.get("val")
        if node.op != "call_function" or not isinstance(value, torch.Tensor) or value.dtype.is_floating_point:
            continue
        args = list(node.args)
        for i, arg in enumerate(args):
            constant_node = isinstance(arg, torch.fx.Node) and arg.op == "get_attr"
            if constant_node and "_tensor_constant_" in str(arg.target):
                constant = getattr(model, str(arg.target))
                if constant.dim() == 0:
                    args[i] = int(constant.item()) if float(constant.item()).is_integer() else constant.item()
                    changed = True
        node.args = tuple(args)
    if changed:
        model.graph.eliminate_dead_code()
        model.recompile()
    return model


def _lower(
    program: torch.export.ExportedProgram, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> tuple[bytes, int, int]:
    """The .pte bytes, and how many graph calls went to XNNPACK and to the portable kernels."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        delegated, portable = _count_calls(edge.exported_program().graph_module)
        return bytes(edge.to_executorch().buffer), delegated, portable
    except Exception as exc:
        raise export_error("ExecuTorch lowering", exc, program.graph_module, _WAY_OUT) from exc


def lower_to_bytes(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """A fixed-shape fp32 .pte of `model` without a parity check (for kernel sweeps of one layer)."""
    with _quiet_executorch():
        program = torch.export.export(model, inputs, strict=False)
        return _lower(program, model, inputs)[0]


def _count_calls(graph_module: torch.fx.GraphModule) -> tuple[int, int]:
    delegated = portable = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "executorch_call_delegate" in name:
            delegated += 1
        elif name != "getitem":
            portable += 1
    return delegated, portable


@contextlib.contextmanager
def _quiet_executorch() -> Iterator[None]:
    """Keep ExecuTorch's lowering chatter off the console unless our logger is at DEBUG."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("executorch", "torch._export", "torchao")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def executorch_parity(
    model: torch.nn.Module,
    path: str | Path,
    example_inputs: Any,
    *,
    variant: str = "fp32",
    check_inputs: list[tuple[torch.Tensor, ...]] | None = None,
    eval_batches: list[tuple[torch.Tensor, ...]] | None = None,
    dynamic_batch: bool = False,
    reference_inputs: tuple[torch.Tensor, ...] | None = None,
) -> ParityReport:
    """Compare a .pte program with PyTorch on the same inputs (and another batch size if dynamic) by the
    one verdict (`slimship.compare.judge_cases`, then top-1 agreement on `eval_batches`)."""
    inputs = as_input_tuple(example_inputs)
    rel_bound, _ = PARITY_BOUNDS[variant]
    runner = open_model_runner(path, runtime="executorch")
    cases = [("example", inputs)] + [(f"check_{i}", c) for i, c in enumerate(check_inputs or [])]
    if variant == "fp32":
        cases += [(f"random_{i}", random_like(inputs, seed=i)) for i in range(2)]
        if dynamic_batch:
            cases.append(("random_batch_3", random_like(inputs, seed=7, batch=3)))
    cases, reference_case = with_reference_case(cases, reference_inputs)
    torch_run = Memo(lambda case: torch_outputs(model, case))
    file_run = Memo(lambda case: _run(runner, to_numpy(case)))
    reference, candidate = [torch_run(c) for _, c in cases], [file_run(c) for _, c in cases]
    cap = MAGNITUDE_CAPS[variant]
    report = compare_outputs(reference, candidate, [n for n, _ in cases], rel_bound, cap)
    report.reference_case = reference_case
    if eval_batches:
        ref_eval, cand_eval = [torch_run(b) for b in eval_batches], [file_run(b) for b in eval_batches]
        agreement_check(report, variant, ref_eval, cand_eval)
    return report


def _run(runner, arrays: list[np.ndarray]) -> list[np.ndarray]:
    try:
        return runner.run(arrays)
    except Exception as exc:
        raise VerificationError(f"the ExecuTorch runtime failed to run the program: {exc}") from exc
