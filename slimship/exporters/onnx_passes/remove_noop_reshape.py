"""Drop Reshapes to the input's own shape; collapse Reshape(Reshape(x)) into one Reshape."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult, bypass_ir, static_dims


class RemoveNoOpReshape(ir.passes.InPlacePass):
    """Drop Reshapes to the input's own shape; collapse Reshape(Reshape(x)) into one Reshape."""

    name: ClassVar[str] = "remove_noop_reshape"

    def call(self, model: ir.Model) -> CountedResult:
        changes = 0
        for node in list(model.graph):
            if node.op_type != "Reshape" or node.domain != "" or node.graph is None or len(node.inputs) < 2:
                continue
            shape = node.inputs[1]
            if node.inputs[0] is None or shape is None or shape.const_value is None:
                continue
            target = shape.const_value.numpy()
            allowzero = node.attributes.get_int("allowzero", 0)
            if _is_noop(static_dims(node.inputs[0]), target.tolist(), allowzero):
                changes += bypass_ir(node)
            elif _collapse(node, target, allowzero):
                changes += 1
        return CountedResult(model, bool(changes), changes)


def _is_noop(dims: list[int | None] | None, target: list[int], allowzero: int) -> bool:
    if dims is None or len(dims) != len(target):
        return False
    mismatched = [
        i
        for i, (d, t) in enumerate(zip(dims, target))
        if not ((t == 0 and not allowzero) or (d is not None and d == t))
    ]
    # one -1 entry is fine when every other dimension matches: it must then equal the input's.
    return not mismatched or (len(mismatched) == 1 and target[mismatched[0]] == -1)


def _collapse(node: ir.Node, target: np.ndarray, allowzero: int) -> bool:
    """Reshape(Reshape(x, s1), s2) -> Reshape(x, s2); the inner Reshape goes when nothing else reads it."""
    src = node.inputs[0]
    inner = src.producer()
    if inner is None or inner.op_type != "Reshape" or inner.domain != "" or inner.inputs[0] is None:
        return False
    if not allowzero and (target == 0).any():  # 0 copies a dim of the intermediate shape
        return False
    node.replace_input_with(0, inner.inputs[0])
    if not src.uses() and not src.is_graph_output():
        node.graph.remove(inner, safe=True)
    return True
