"""The pass base class and the graph-editing helpers the graph passes share."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
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


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """An initializer's values, or None for anything else (a computed or absent value)."""
    return None if value is None or value.const_value is None else value.const_value.numpy()


def static_dims(value: ir.Value) -> list[int | None] | None:
    """The value's dims with None for unknown/symbolic ones, or None when even the rank is unknown."""
    if value.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in value.shape]
