"""CastLike(constant, x) with x's dtype known -> a constant (the exporter's way to type a literal)."""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult


class FoldCastLike(ir.passes.InPlacePass):
    """CastLike(initializer, x) with x's dtype known -> a new initializer of that dtype."""

    name: ClassVar[str] = "fold_castlike"

    def call(self, model: ir.Model) -> CountedResult:
        changes = 0
        graph = model.graph
        for node in list(graph):
            if node.op_type != "CastLike" or node.domain != "" or node.outputs[0].is_graph_output():
                continue
            src, like = node.inputs[0], node.inputs[1]
            if src is None or like is None or src.const_value is None or like.dtype is None:
                continue
            out = node.outputs[0]
            array = src.const_value.numpy().astype(like.dtype.numpy())
            folded = ir.Value(
                name=f"{out.name}.folded",
                type=ir.TensorType(like.dtype),
                shape=ir.Shape(array.shape),
                const_value=ir.tensor(array, name=f"{out.name}.folded"),
            )
            graph.register_initializer(folded)
            ir.convenience.replace_all_uses_with(out, folded)
            graph.remove(node, safe=True)
            changes += 1
        return CountedResult(model, bool(changes), changes)
