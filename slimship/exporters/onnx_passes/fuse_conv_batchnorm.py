"""Fold an inference-mode BatchNormalization into the Conv that feeds only it."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from slimship.exporters.onnx_passes.base import CountedResult, bypass_ir, const_array


class FuseConvBatchNorm(ir.passes.InPlacePass):
    """Fold an inference-mode BatchNormalization into the Conv that feeds only it."""

    name: ClassVar[str] = "fuse_conv_batchnorm"

    def call(self, model: ir.Model) -> CountedResult:
        changes = 0
        for bn in list(model.graph):
            if bn.op_type == "BatchNormalization" and bn.domain == "" and _fuse(model.graph, bn):
                changes += 1
        return CountedResult(model, bool(changes), changes)


def _fuse(graph: ir.Graph, bn: ir.Node) -> bool:
    x = bn.inputs[0]
    conv = None if x is None else x.producer()
    if (
        conv is None
        or conv.op_type != "Conv"
        or conv.domain != ""
        or len(x.uses()) != 1
        or x.is_graph_output()
    ):
        return False
    if bn.attributes.get_int("training_mode", 0) or any(
        v.uses() or v.is_graph_output() for v in bn.outputs[1:]
    ):
        return False
    weight = const_array(conv.inputs[1])
    params = [const_array(v) for v in bn.inputs[1:5]]
    if weight is None or len(params) != 4 or any(p is None for p in params):
        return False
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    bias = const_array(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0], weight.dtype)
    if bias is None:
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    scale = gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    new_w = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
    new_b = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)
    if not bypass_ir(bn):
        return False
    if len(conv.inputs) < 3:
        conv.resize_inputs(3)
    for index, array, suffix in ((1, new_w, "fused_weight"), (2, new_b, "fused_bias")):
        name = f"{x.name}.{suffix}"
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        conv.replace_input_with(index, value)
    return True
