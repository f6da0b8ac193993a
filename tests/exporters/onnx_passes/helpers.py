"""Build small ONNX graphs, run them, and check a surgery keeps their numerics."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimship.exporters.onnx_passes import run_surgery
from slimship.runtimes.device_runner import open_runner

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def value(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array), name)


def run(model: onnx.ModelProto, feeds: list[np.ndarray], tmp_path, tag: str) -> list[np.ndarray]:
    path = tmp_path / f"{tag}.onnx"
    path.write_bytes(model.SerializeToString())
    return open_runner(str(path)).run(feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def surgery_keeps_numerics(model, passes, feeds, tmp_path):
    new, report = run_surgery(model, passes)
    onnx.checker.check_model(new, full_check=True)
    before = run(model, feeds, tmp_path, "before")
    after = run(new, feeds, tmp_path, "after")
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    return new, report
