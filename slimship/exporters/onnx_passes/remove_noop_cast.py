"""Drop Cast nodes whose target type equals the input's type."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, bypass


class RemoveNoOpCast(Pass):
    """Drop Cast nodes whose target type equals the input's type."""

    name = "remove_noop_cast"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "Cast" or node.inputs[0].dtype is None:
                continue
            target = onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))
            if np.dtype(node.inputs[0].dtype) == target:
                self.last_changes += bypass(graph, node)
        return self.last_changes > 0
