"""CastLike(constant, x) with x's dtype known -> a constant (the exporter's way to type a literal)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, const_value, is_graph_output, replace_uses


class FoldCastLike(Pass):
    """CastLike(constant, x) with x's dtype known -> a constant (the exporter's way to type a literal)."""

    name = "fold_castlike"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "CastLike" or not node.outputs or is_graph_output(graph, node.outputs[0]):
                continue
            values, like = const_value(node.inputs[0]), node.inputs[1]
            if values is None or like.dtype is None:
                continue
            const = gs.Constant(f"{node.outputs[0].name}.folded", values.astype(np.dtype(like.dtype)))
            replace_uses(graph, node.outputs[0], const)
            node.outputs.clear()
            self.last_changes += 1
        return self.last_changes > 0
