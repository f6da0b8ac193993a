"""Drop Identity nodes and inference-mode Dropout whose mask output is unused."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, bypass, const_value, unused


class RemoveIdentity(Pass):
    """Drop Identity nodes and inference-mode Dropout whose mask output is unused."""

    name = "remove_identity"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op == "Identity" or (node.op == "Dropout" and self._is_noop_dropout(graph, node)):
                self.last_changes += bypass(graph, node)
        return self.last_changes > 0

    @staticmethod
    def _is_noop_dropout(graph: gs.Graph, node: gs.Node) -> bool:
        if any(not unused(t, graph) for t in node.outputs[1:]):
            return False
        if len(node.inputs) >= 3 and node.inputs[2].name:
            training = const_value(node.inputs[2])
            return training is not None and not bool(training)
        return True
