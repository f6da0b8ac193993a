"""RemoveNoOpReshape: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import helper

from slimship.exporters.onnx_passes import RemoveNoOpReshape
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def test_remove_noop_reshape_and_collapse_chain(tmp_path):
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "same"], ["a"]),
            helper.make_node("Reshape", ["a", "flat"], ["b"]),
            helper.make_node("Reshape", ["b", "two"], ["c"]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        [value("x", ["N", 3, 4])],
        [value("y", ["N", 12])],
        [
            init("same", np.array([0, 3, -1], np.int64)),
            init("flat", np.array([-1, 4], np.int64)),
            init("two", np.array([-1, 12], np.int64)),
        ],
    )
    feeds = [RNG.standard_normal((5, 3, 4), np.float32)]
    new, report = surgery_keeps_numerics(model, [RemoveNoOpReshape()], feeds, tmp_path)
    assert ops(new) == ["Reshape", "Relu"]
    assert report.changes["remove_noop_reshape"] == 2


def test_collapse_keeps_an_inner_reshape_another_node_reads(tmp_path):
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "flat"], ["a"]),
            helper.make_node("Reshape", ["a", "two"], ["b"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("Relu", ["b"], ["z"]),
        ],
        [value("x", [3, 4])],
        [value("y", [2, 6]), value("z", [12])],
        [init("flat", np.array([2, 6], np.int64)), init("two", np.array([12], np.int64))],
    )
    feeds = [RNG.standard_normal((3, 4), np.float32)]
    new, report = surgery_keeps_numerics(model, [RemoveNoOpReshape()], feeds, tmp_path)
    assert ops(new) == ["Reshape", "Reshape", "Relu", "Relu"] and report.changes["remove_noop_reshape"] == 1
    assert new.graph.node[1].input[0] == "x"  # the outer Reshape now reads x
