"""Fold an inference-mode BatchNormalization into the Conv that feeds only it."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from slimship.exporters.onnx_passes.base import Pass, const_value, is_graph_output, unused


class FuseConvBatchNorm(Pass):
    """Fold an inference-mode BatchNormalization into the Conv that feeds only it."""

    name = "fuse_conv_batchnorm"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for bn in list(graph.nodes):
            if bn.op == "BatchNormalization" and self._fuse(graph, bn):
                self.last_changes += 1
        return self.last_changes > 0

    @staticmethod
    def _fuse(graph: gs.Graph, bn: gs.Node) -> bool:
        x = bn.inputs[0]
        if not x.inputs or x.inputs[0].op != "Conv" or len(x.outputs) != 1 or is_graph_output(graph, x):
            return False
        if int(bn.attrs.get("training_mode", 0)) or any(not unused(t, graph) for t in bn.outputs[1:]):
            return False
        conv = x.inputs[0]
        weight = const_value(conv.inputs[1])
        params = [const_value(t) for t in bn.inputs[1:5]]
        if weight is None or any(p is None for p in params):
            return False
        bias = (
            const_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(weight.shape[0], weight.dtype)
        )
        if bias is None:
            return False
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        new_w = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(
            weight.dtype
        )
        new_b = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)
        conv.inputs[1] = gs.Constant(f"{conv.name}.fused_weight", new_w)
        fused_bias = gs.Constant(f"{conv.name}.fused_bias", new_b)
        if len(conv.inputs) > 2:
            conv.inputs[2] = fused_bias
        else:
            conv.inputs.append(fused_bias)
        out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = out
        return True
