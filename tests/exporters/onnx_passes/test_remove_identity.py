"""RemoveIdentity: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from slimship.exporters.onnx_passes import RemoveIdentity, run_surgery
from tests.exporters.onnx_passes.helpers import RNG, make_model, ops, surgery_keeps_numerics, value


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
