"""Make consumers of equal constants (dtype, shape and bytes) share one tensor."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, is_graph_output, replace_uses


class DeduplicateConstants(Pass):
    """Make consumers of equal constants (dtype, shape and bytes) share one tensor.

    The shape is the constant's own: a scalar and a one-element vector with the same bytes differ
    (merging them changes the rank of a Gather, Unsqueeze or Concat result downstream).
    """

    name = "deduplicate_constants"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        seen: dict[tuple, gs.Constant] = {}
        for _, tensor in sorted(graph.tensors().items()):
            if not isinstance(tensor, gs.Constant) or is_graph_output(graph, tensor):
                continue
            values = np.asarray(tensor.values)  # not ascontiguousarray: it turns a scalar into shape (1,)
            digest = hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()
            key = (values.dtype.str, values.shape, digest)
            keep = seen.setdefault(key, tensor)
            if keep is not tensor and tensor.outputs:
                replace_uses(graph, tensor, keep)
                self.last_changes += 1
        return self.last_changes > 0
