"""The pass manager: runs passes to a fixed point and reports what they did.

Graph passes only rewire edges; the manager removes dead nodes (`graph.cleanup()`) after each graph pass,
re-infers shapes between rounds and stops when a whole round changes nothing (or after `max_iterations`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir

from slimship.errors import ExportError
from slimship.exporters.onnx_passes.base import AnyPass, CountedResult, Pass, pass_name
from slimship.exporters.onnx_passes.defaults import default_passes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SurgeryReport:
    """What the pass manager did: sizes before/after and rewrites per pass."""

    nodes_before: int
    nodes_after: int
    initializers_before: int
    initializers_after: int
    bytes_before: int
    bytes_after: int
    iterations: int
    converged: bool
    changes: dict[str, int]
    op_counts_before: dict[str, int]
    op_counts_after: dict[str, int]


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shape inference is a help for the passes, not a requirement
        log.debug("shape inference failed during surgery: %s", exc)
        return model


def _export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = template.ir_version
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    del model.graph.value_info[:]  # stale after rewrites; shape inference refills it
    return model


def run_surgery(
    model: onnx.ModelProto, passes: list[AnyPass] | None = None, max_iterations: int = 8
) -> tuple[onnx.ModelProto, SurgeryReport]:
    """Run `passes` (default: `default_passes()`) to a fixed point; return the new model and a report.

    Each round runs the onnx-ir passes (on one `ir.Model`), then our model passes, then our graph passes.
    """
    if not isinstance(model, onnx.ModelProto):
        raise ExportError(f"run_surgery expects an onnx.ModelProto, got {type(model).__name__}")
    passes = default_passes() if passes is None else passes
    changes = {pass_name(p): 0 for p in passes}
    ir_passes = [p for p in passes if isinstance(p, ir.passes.PassBase)]
    ours = [p for p in passes if not isinstance(p, ir.passes.PassBase)]
    before = model
    current = onnx.ModelProto()
    current.CopyFrom(model)
    converged = False
    iterations = 0
    while iterations < max_iterations:
        iterations += 1
        current = _infer(current)  # the onnx-ir passes read dtypes too
        current, changed = _apply_ir(ir_passes, current, changes)
        for p in (p for p in ours if p.level == "model"):
            changed |= _apply(p, current, changes)
        graph = gs.import_onnx(_infer(current) if changed else current)
        for p in (p for p in ours if p.level == "graph"):
            if _apply(p, graph, changes):
                changed = True
                graph.cleanup().toposort()
        current = _export(graph, current)
        if not changed:
            converged = True
            break
    if not converged:
        log.warning("surgery stopped after %d rounds without reaching a fixed point", max_iterations)
    current = _infer(current)
    report = SurgeryReport(
        nodes_before=len(before.graph.node),
        nodes_after=len(current.graph.node),
        initializers_before=len(before.graph.initializer),
        initializers_after=len(current.graph.initializer),
        bytes_before=before.ByteSize(),
        bytes_after=current.ByteSize(),
        iterations=iterations,
        converged=converged,
        changes=changes,
        op_counts_before=dict(Counter(n.op_type for n in before.graph.node)),
        op_counts_after=dict(Counter(n.op_type for n in current.graph.node)),
    )
    log.info(
        "surgery: %d -> %d nodes in %d rounds (%s)",
        report.nodes_before,
        report.nodes_after,
        iterations,
        ", ".join(f"{k}={v}" for k, v in changes.items() if v),
    )
    return current, report


def _failed(p: AnyPass, exc: Exception) -> ExportError:
    return ExportError(
        f"ONNX surgery pass {pass_name(p)!r} failed: {type(exc).__name__}: {exc}. "
        "Run export_onnx(..., surgery=False) to skip surgery, or drop this pass from `passes`."
    )


def _apply(p: Pass, target, changes: dict[str, int]) -> bool:
    p.last_changes = 0
    try:
        changed = bool(p.run(target))
    except Exception as exc:
        raise _failed(p, exc) from exc
    changes[p.name] = changes.get(p.name, 0) + p.last_changes
    return changed


def _size(model: ir.Model) -> int:
    return sum(len(g) + len(g.initializers) for g in model.graphs())


def _apply_ir(
    passes: list[ir.passes.PassBase], proto: onnx.ModelProto, changes: dict[str, int]
) -> tuple[onnx.ModelProto, bool]:
    """Run onnx-ir passes in order on one `ir.Model`; a pass's changes are its `CountedResult.changes`,
    else the nodes and initializers it removed (at least 1 when it reports `modified`)."""
    if not passes:
        return proto, False
    model = ir.serde.deserialize_model(proto)
    changed = False
    for p in passes:
        size = _size(model)
        try:
            result = p(model)
        except Exception as exc:
            raise _failed(p, exc) from exc
        model = result.model
        if result.modified:
            changed = True
            name = pass_name(p)
            count = result.changes if isinstance(result, CountedResult) else max(size - _size(model), 1)
            changes[name] = changes.get(name, 0) + count
    return (ir.serde.serialize_model(model), True) if changed else (proto, False)
