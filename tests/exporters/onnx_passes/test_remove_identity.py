"""RemoveIdentity: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from slimship.exporters.onnx_passes import RemoveIdentity, run_surgery
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def test_remove_identity_and_dropout(tmp_path):
    model = make_model(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Dropout", ["a"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]),
            helper.make_node("Identity", ["c"], ["y"]),  # feeds the graph output
        ],
        [value("x", [2, 3])],
        [value("y", [2, 3])],
    )
    new, report = surgery_keeps_numerics(
        model, [RemoveIdentity()], [RNG.standard_normal((2, 3), np.float32)], tmp_path
    )
    assert ops(new) == ["Relu"]
    assert report.changes["remove_identity"] == 3
    assert report.nodes_before == 4 and report.nodes_after == 1


def test_dropout_with_used_mask_is_kept(tmp_path):
    model = make_model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"])],
        [value("x", [2, 3])],
        [value("y", [2, 3]), value("mask", [2, 3], TensorProto.BOOL)],
    )
    new, report = run_surgery(model, [RemoveIdentity()])
    assert ops(new) == ["Dropout"] and report.changes["remove_identity"] == 0


def test_training_dropout_and_input_to_output_identity_are_kept():
    model = make_model(
        [
            helper.make_node("Dropout", ["x", "ratio", "train"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
            helper.make_node("Identity", ["x"], ["z"]),  # graph input straight to a graph output
        ],
        [value("x", [2, 3])],
        [value("y", [2, 3]), value("z", [2, 3])],
        [init("ratio", np.array(0.5, np.float32)), init("train", np.array(True))],
    )
    new, report = run_surgery(model, [RemoveIdentity()])
    assert ops(new) == ["Dropout", "Relu", "Identity"] and report.changes["remove_identity"] == 0
    assert [o.name for o in new.graph.output] == ["y", "z"]


def test_inference_dropout_with_constant_false_training_goes(tmp_path):
    model = make_model(
        [helper.make_node("Dropout", ["x", "ratio", "train"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        [value("x", [2, 3])],
        [value("y", [2, 3])],
        [init("ratio", np.array(0.5, np.float32)), init("train", np.array(False))],
    )
    new, report = surgery_keeps_numerics(
        model, [RemoveIdentity()], [RNG.standard_normal((2, 3), np.float32)], tmp_path
    )
    assert ops(new) == ["Relu"] and report.changes["remove_identity"] == 1
