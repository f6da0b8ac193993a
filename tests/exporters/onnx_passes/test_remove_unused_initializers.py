"""RemoveUnusedInitializers: onnx-ir's dead-code pass, plus old-IR initializers listed as graph inputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimship.exporters.onnx_passes import RemoveUnusedInitializers, run_surgery


def _old_ir_model() -> onnx.ModelProto:
    """IR version 3: every initializer is also a graph input; `unused` feeds nothing."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("unused", TensorProto.FLOAT, [8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [
            numpy_helper.from_array(np.arange(4, dtype=np.float32), "w"),
            numpy_helper.from_array(np.zeros(8, np.float32), "unused"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.checker.check_model(model)
    return model


def test_old_ir_unused_initializer_leaves_inputs_too():
    result = RemoveUnusedInitializers()(ir.serde.deserialize_model(_old_ir_model()))
    new = ir.serde.serialize_model(result.model)
    onnx.checker.check_model(new, full_check=True)
    assert result.modified and [i.name for i in new.graph.initializer] == ["w"]
    assert [i.name for i in new.graph.input] == ["x", "w"]  # the used one stays part of the signature


def test_counts_removed_initializers_in_the_report():
    model = _old_ir_model()
    del model.graph.input[1:]  # IR 10 style: initializers are not inputs
    model.ir_version = 10
    model.opset_import[0].version = 18
    new, report = run_surgery(model, [RemoveUnusedInitializers()])
    onnx.checker.check_model(new, full_check=True)
    assert [i.name for i in new.graph.initializer] == ["w"] and [i.name for i in new.graph.input] == ["x"]
    assert report.changes == {"remove_unused_initializers": 1} and report.converged


def test_is_an_onnx_ir_pass_with_a_pass_result():
    model = ir.serde.deserialize_model(_old_ir_model())
    result = ir.passes.PassManager([RemoveUnusedInitializers()], steps=2)(model)
    assert result.modified and list(result.model.graph.initializers) == ["w"]
    again = RemoveUnusedInitializers()(result.model)
    assert not again.modified
