"""The pass base class and the graph-editing helpers the graph passes share."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import onnx_ir as ir


class Pass:
    """Base class: subclasses set `name`, `level` and implement `run`."""

    name: ClassVar[str] = "pass"
    level: ClassVar[str] = "graph"

    def __init__(self) -> None:
        self.last_changes = 0

    def run(self, target) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


# ours (on a gs graph or the ModelProto) or an onnx-ir pass (`call(model) -> PassResult`)
AnyPass = Pass | ir.passes.PassBase


@dataclasses.dataclass
class CountedResult(ir.passes.PassResult):
    """An onnx-ir `PassResult` that also says how many rewrites the pass made (the report's count)."""

    changes: int = 0


def pass_name(p: AnyPass) -> str:
    """The key a pass's changes are reported under: its `name`, else its class name."""
    return getattr(p, "name", None) or type(p).__name__


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(out is tensor for out in graph.outputs)


def replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every consumer of `old` read `new` instead."""
    for consumer in list(old.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[i] = new


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


def static_dims(tensor: gs.Tensor) -> list[int | None] | None:
    """The tensor's dims with None for unknown/symbolic ones, or None when even the rank is unknown."""
    if tensor.shape is None:
        return None
    return [d if isinstance(d, int | np.integer) and d >= 0 else None for d in tensor.shape]


# ---------------------------------------------------------------- onnx-ir helpers


def bypass_ir(node: ir.Node) -> bool:
    """Remove a node whose first output equals its first input; False when it cannot be removed.

    When that output is a graph output, the input takes its name (unless the input is itself a graph
    input, initializer or graph output: then the node stays).
    """
    src, dst = node.inputs[0], node.outputs[0]
    if src is None or node.graph is None:
        return False
    if dst.is_graph_output():
        if src.is_graph_input() or src.is_initializer() or src.is_graph_output():
            return False
        name = dst.name
        ir.convenience.replace_all_uses_with(dst, src, replace_graph_outputs=True)
        dst.name = None
        src.name = name
    else:
        ir.convenience.replace_all_uses_with(dst, src)
    node.graph.remove(node, safe=True)
    return True
