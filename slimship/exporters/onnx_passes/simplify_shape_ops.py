"""Replace Shape / Gather(Shape) / Slice(Shape) by constants where the dims involved are static."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, const_value, is_graph_output, replace_uses, static_dims


class SimplifyShapeOps(Pass):
    """Replace Shape / Gather(Shape) / Slice(Shape) by constants where the dims involved are static."""

    name = "simplify_shape_ops"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in list(graph.nodes):
            if not node.outputs or is_graph_output(graph, node.outputs[0]):
                continue
            rule = self._RULES.get(node.op)
            value = rule(node) if rule else None
            if value is not None:
                const = gs.Constant(f"{node.outputs[0].name}.folded", np.asarray(value, dtype=np.int64))
                replace_uses(graph, node.outputs[0], const)
                node.outputs.clear()
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
    def _shape_dims(node: gs.Node) -> list[int | None] | None:
        dims = static_dims(node.inputs[0])
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
        return dims[slice(start, end)]

    @classmethod
    def _shape(cls, node: gs.Node) -> list[int] | None:
        dims = cls._shape_dims(node)
        return dims if dims is not None and None not in dims else None

    @classmethod
    def _gather(cls, node: gs.Node) -> np.ndarray | None:
        src, indices = node.inputs[0], const_value(node.inputs[1])
        if indices is None or not src.inputs or src.inputs[0].op != "Shape" or int(node.attrs.get("axis", 0)):
            return None
        dims = cls._shape_dims(src.inputs[0])
        if dims is None:
            return None
        picked = np.asarray(np.asarray(dims, dtype=object)[indices], dtype=object)
        return None if any(d is None for d in picked.ravel()) else picked.astype(np.int64)

    @classmethod
    def _slice(cls, node: gs.Node) -> list[int] | None:
        src = node.inputs[0]
        params = [const_value(t) for t in node.inputs[1:]]
        if not src.inputs or src.inputs[0].op != "Shape" or any(p is None for p in params):
            return None
        dims = cls._shape_dims(src.inputs[0])
        if dims is None:
            return None
        starts, ends = int(params[0][0]), int(params[1][0])
        if len(params) > 2 and int(params[2][0]) not in (0, -1):
            return None
        step = int(params[3][0]) if len(params) > 3 else 1
        picked = dims[slice(starts, ends, step)]
        return None if None in picked else picked

    _RULES: ClassVar[dict] = {}


SimplifyShapeOps._RULES = {
    "Shape": SimplifyShapeOps._shape,
    "Gather": SimplifyShapeOps._gather,
    "Slice": SimplifyShapeOps._slice,
}
