"""Delete initializers (and nodes) nothing reads: onnx-ir's dead-code pass, plus old-IR input entries."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass


class RemoveUnusedInitializers(ir.passes.InPlacePass):
    """onnx-ir's `RemoveUnusedNodesPass`; an unused initializer an old IR version also lists as a graph
    input (which that pass keeps, as part of the signature) goes too, with its input entry."""

    name: ClassVar[str] = "remove_unused_initializers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = RemoveUnusedNodesPass()(model).modified
        graph = model.graph
        for value in list(graph.inputs):
            if (
                graph.initializers.get(value.name) is value
                and not value.uses()
                and not value.is_graph_output()
            ):
                graph.inputs.remove(value)
                del graph.initializers[value.name]
                modified = True
        return ir.passes.PassResult(model, modified)
