"""Evaluate nodes whose inputs are all constant (via onnx-graphsurgeon + onnxruntime)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass


class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constant (via onnx-graphsurgeon + onnxruntime)."""

    name = "fold_constants"

    def __init__(self, size_threshold: int = 1 << 22) -> None:
        super().__init__()
        self.size_threshold = size_threshold

    def run(self, graph: gs.Graph) -> bool:
        before = len(graph.nodes)
        graph.fold_constants(fold_shapes=False, size_threshold=self.size_threshold, error_ok=True)
        graph.cleanup()
        self.last_changes = max(before - len(graph.nodes), 0)
        return self.last_changes > 0
