"""RemoveNoOpCast: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from slimship.exporters.onnx_passes import RemoveNoOpCast, run_surgery
from tests.exporters.onnx_passes.helpers import RNG, make_model, ops, surgery_keeps_numerics, value


def test_remove_noop_cast_keeps_real_cast(tmp_path):
    model = make_model(
        [
            helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["a"], ["b"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["b"], ["y"], to=TensorProto.FLOAT),
        ],
        [value("x", [4])],
        [value("y", [4])],
    )
    new, report = surgery_keeps_numerics(
        model, [RemoveNoOpCast()], [RNG.standard_normal(4).astype(np.float32)], tmp_path
    )
    assert ops(new) == ["Cast", "Cast"]
    assert report.changes["remove_noop_cast"] == 1


def test_noop_cast_feeding_the_graph_output_hands_over_its_name(tmp_path):
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT),
        ],
        [value("x", [4])],
        [value("y", [4])],
    )
    new, report = surgery_keeps_numerics(
        model, [RemoveNoOpCast()], [RNG.standard_normal(4).astype(np.float32)], tmp_path
    )
    assert ops(new) == ["Relu"] and new.graph.node[0].output[0] == "y"
    assert report.changes["remove_noop_cast"] == 1


def test_noop_cast_from_graph_input_to_graph_output_stays():
    model = make_model(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], [value("x", [4])], [value("y", [4])]
    )
    new, report = run_surgery(model, [RemoveNoOpCast()])
    assert ops(new) == ["Cast"] and report.changes["remove_noop_cast"] == 0 and report.converged
