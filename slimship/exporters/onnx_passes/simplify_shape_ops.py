"""Replace Shape / Gather(Shape) / Slice(Shape) by constants where the dims involved are static."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult, const_array, static_dims


class SimplifyShapeOps(ir.passes.InPlacePass):
    """Replace Shape / Gather(Shape) / Slice(Shape) by int64 initializers where the dims are static."""

    name: ClassVar[str] = "simplify_shape_ops"

    def call(self, model: ir.Model) -> CountedResult:
        changes = 0
        graph = model.graph
        for node in list(graph):
            rule = _RULES.get(node.op_type) if node.domain == "" and node.graph is graph else None
            if rule is None or not node.outputs or node.outputs[0].is_graph_output():
                continue
            value = rule(node)
            if value is None:
                continue
            out = node.outputs[0]
            name = f"{out.name}.folded"
            const = ir.Value(name=name, const_value=ir.tensor(np.asarray(value, dtype=np.int64), name=name))
            graph.register_initializer(const)
            ir.convenience.replace_all_uses_with(out, const)
            shape = _shape_producer(node) if node.op_type != "Shape" else None
            graph.remove(node, safe=True)
            if shape is not None and not shape.outputs[0].uses() and not shape.outputs[0].is_graph_output():
                graph.remove(shape, safe=True)
            changes += 1
        return CountedResult(model, bool(changes), changes)


def _shape_producer(node: ir.Node) -> ir.Node | None:
    """The Shape node feeding `node`'s first input, or None."""
    src = node.inputs[0]
    producer = None if src is None else src.producer()
    return (
        producer if producer is not None and producer.op_type == "Shape" and producer.domain == "" else None
    )


def _shape_dims(shape: ir.Node) -> list[int | None] | None:
    """The dims a Shape node returns (None for unknown/symbolic ones), or None when the rank is unknown."""
    dims = None if shape.inputs[0] is None else static_dims(shape.inputs[0])
    if dims is None:
        return None
    start, end = shape.attributes.get_int("start", 0), shape.attributes.get_int("end", len(dims))
    return dims[slice(start, end)]


def _shape(node: ir.Node) -> list[int] | None:
    dims = _shape_dims(node)
    return dims if dims is not None and None not in dims else None


def _gather(node: ir.Node) -> np.ndarray | None:
    shape, indices = _shape_producer(node), const_array(node.inputs[1])
    if shape is None or indices is None or node.attributes.get_int("axis", 0):
        return None
    dims = _shape_dims(shape)
    if dims is None:
        return None
    picked = np.asarray(np.asarray(dims, dtype=object)[indices], dtype=object)
    return None if any(d is None for d in picked.ravel()) else picked.astype(np.int64)


def _slice(node: ir.Node) -> list[int] | None:
    shape = _shape_producer(node)
    params = [const_array(v) for v in node.inputs[1:]]
    if shape is None or len(params) < 2 or any(p is None for p in params):
        return None
    dims = _shape_dims(shape)
    if dims is None:
        return None
    starts, ends = int(params[0][0]), int(params[1][0])
    if len(params) > 2 and int(params[2][0]) not in (0, -1):
        return None
    step = int(params[3][0]) if len(params) > 3 else 1
    picked = dims[slice(starts, ends, step)]
    return None if None in picked else picked


_RULES: dict[str, Callable[[ir.Node], object]] = {"Shape": _shape, "Gather": _gather, "Slice": _slice}
