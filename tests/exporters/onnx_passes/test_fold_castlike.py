"""FoldCastLike: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from slimship.exporters.onnx_passes import FoldCastLike, FoldConstants
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def test_fold_castlike_then_expand(tmp_path):
    model = make_model(
        [
            helper.make_node("CastLike", ["zero", "x"], ["z"]),
            helper.make_node("Expand", ["z", "shape"], ["bias"]),
            helper.make_node("Add", ["x", "bias"], ["y"]),
        ],
        [value("x", [2, 3])],
        [value("y", [2, 3])],
        [init("zero", np.array(0.5, np.float64)), init("shape", np.array([3], np.int64))],
    )
    feeds = [RNG.standard_normal((2, 3), np.float32)]
    new, report = surgery_keeps_numerics(model, [FoldCastLike(), FoldConstants()], feeds, tmp_path)
    assert ops(new) == ["Add"] and report.changes["fold_castlike"] == 1
    assert new.graph.initializer[0].data_type == TensorProto.FLOAT
