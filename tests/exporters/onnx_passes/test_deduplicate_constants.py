"""DeduplicateConstants: onnx-ir's initializer deduplication, without its size limit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimship.exporters.onnx_passes import DeduplicateConstants, run_surgery
from slimship.runtimes.device_runner import open_runner


def _two_equal_weights(n: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_merges_equal_weights_above_onnx_irs_default_limit(tmp_path):
    model = _two_equal_weights(4096)  # onnx-ir's own pass skips tensors over 1024 elements by default
    new, report = run_surgery(model, [DeduplicateConstants()])
    onnx.checker.check_model(new, full_check=True)
    assert len(new.graph.initializer) == 1 and report.changes == {"deduplicate_constants": 1}
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    outputs = []
    for tag, m in (("before", model), ("after", new)):
        path = tmp_path / f"{tag}.onnx"
        path.write_bytes(m.SerializeToString())
        outputs.append(open_runner(str(path)).run([x])[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_keeps_different_weights_apart():
    model = _two_equal_weights(8)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(8, np.float32), "w2"))
    result = DeduplicateConstants()(ir.serde.deserialize_model(model))
    assert not result.modified and len(result.model.graph.initializers) == 2
