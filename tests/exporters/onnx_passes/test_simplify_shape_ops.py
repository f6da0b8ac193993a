"""SimplifyShapeOps: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from slimship.exporters.onnx_passes import FoldConstants, SimplifyShapeOps, run_surgery
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def test_simplify_shape_ops_then_fold(tmp_path):
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["d1"]),
            helper.make_node("Slice", ["s", "st", "en"], ["d23"]),
            helper.make_node("Unsqueeze", ["d1", "zero"], ["d1u"]),
            helper.make_node("Mul", ["d23", "d23"], ["sq"]),
            helper.make_node("Concat", ["minus", "d1u", "sq"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        [value("x", ["N", 3, 2])],
        [value("y", ["N", 3, 4])],
        [
            init("one", np.array(1, np.int64)),
            init("zero", np.array([0], np.int64)),
            init("st", np.array([2], np.int64)),
            init("en", np.array([3], np.int64)),
            init("minus", np.array([-1], np.int64)),
        ],
    )
    feeds = [RNG.standard_normal((4, 3, 2), np.float32)]
    new, report = surgery_keeps_numerics(model, [SimplifyShapeOps(), FoldConstants()], feeds, tmp_path)
    assert ops(new) == ["Reshape"]
    assert report.changes["simplify_shape_ops"] == 2
    assert report.changes["fold_constants"] >= 3


def test_shape_of_dynamic_dim_is_kept():
    model = make_model(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["y"])],
        [value("x", ["N", 3])],
        [value("y", [], TensorProto.INT64)],
        [init("zero", np.array(0, np.int64))],
    )
    new, report = run_surgery(model, [SimplifyShapeOps()])
    assert ops(new) == ["Shape", "Gather"] and report.changes["simplify_shape_ops"] == 0


def test_static_dim_of_a_dynamic_shape_folds_and_the_shape_goes(tmp_path):
    model = make_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
            helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "cf"], ["y"]),
        ],
        [value("x", ["N", 3])],
        [value("y", ["N", 3])],
        [init("one", np.array(1, np.int64))],
    )
    new, report = surgery_keeps_numerics(
        model, [SimplifyShapeOps()], [RNG.standard_normal((4, 3), np.float32)], tmp_path
    )
    assert ops(new) == ["Cast", "Mul"] and report.changes["simplify_shape_ops"] == 1
