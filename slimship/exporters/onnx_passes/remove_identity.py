"""Drop Identity nodes and inference-mode Dropout whose mask output is unused (onnx-ir's pass)."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass


class RemoveIdentity(ir.passes.InPlacePass):
    """Turn each no-op Dropout into an Identity, then run onnx-ir's `IdentityEliminationPass`.

    A Dropout is a no-op when its mask output is unused and its `training_mode` input is absent or a
    constant false. An Identity from a graph input (or initializer) to a graph output stays.
    """

    name: ClassVar[str] = "remove_identity"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if _is_noop_dropout(node) and not _pinned(node):
                node.op_type = "Identity"
                node.resize_inputs(1)
                node.resize_outputs(1)
                node.attributes.clear()
        return IdentityEliminationPass()(model)


def _is_noop_dropout(node: ir.Node) -> bool:
    if node.op_type != "Dropout" or node.domain != "" or not node.inputs or node.inputs[0] is None:
        return False
    if any(v.uses() or v.is_graph_output() for v in node.outputs[1:]):
        return False
    training = node.inputs[2] if len(node.inputs) >= 3 else None
    if training is None:
        return True
    value = training.const_value
    return value is not None and not bool(value.numpy())


def _pinned(node: ir.Node) -> bool:
    """IdentityEliminationPass keeps it: a graph input or initializer written straight to a graph output."""
    src = node.inputs[0]
    return node.outputs[0].is_graph_output() and (src.is_graph_input() or src.is_initializer())
