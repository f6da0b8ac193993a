"""FoldCastLike: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

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


def test_fold_castlike_to_half_and_keeps_a_graph_output(tmp_path):
    model = make_model(
        [
            helper.make_node("CastLike", ["third", "x"], ["t"]),
            helper.make_node("Mul", ["x", "t"], ["y"]),
            helper.make_node("CastLike", ["third", "x"], ["z"]),  # a graph output: stays
        ],
        [value("x", [3], TensorProto.FLOAT16)],
        [value("y", [3], TensorProto.FLOAT16), value("z", [], TensorProto.FLOAT16)],
        [init("third", np.array(1 / 3, np.float64))],
    )
    feeds = [RNG.standard_normal(3).astype(np.float16)]
    new, report = surgery_keeps_numerics(model, [FoldCastLike()], feeds, tmp_path)
    assert ops(new) == ["Mul", "CastLike"] and report.changes["fold_castlike"] == 1
    folded = [i for i in new.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert [numpy_helper.to_array(i).item() for i in folded] == [np.float16(1 / 3)]
