"""Drop Reshapes to the input's own shape; collapse Reshape(Reshape(x)) into one Reshape."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, bypass, const_value, static_dims


class RemoveNoOpReshape(Pass):
    """Drop Reshapes to the input's own shape; collapse Reshape(Reshape(x)) into one Reshape."""

    name = "remove_noop_reshape"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if node.op != "Reshape" or not node.outputs:
                continue
            target = const_value(node.inputs[1])
            if target is None:
                continue
            allowzero = int(node.attrs.get("allowzero", 0))
            if self._is_noop(static_dims(node.inputs[0]), target.tolist(), allowzero):
                self.last_changes += bypass(graph, node)
            elif self._collapse(node, target, allowzero):
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
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

    @staticmethod
    def _collapse(node: gs.Node, target: np.ndarray, allowzero: int) -> bool:
        src = node.inputs[0]
        if not src.inputs or src.inputs[0].op != "Reshape":
            return False
        if not allowzero and (target == 0).any():  # 0 copies a dim of the intermediate shape
            return False
        node.inputs[0] = src.inputs[0].inputs[0]
        return True
