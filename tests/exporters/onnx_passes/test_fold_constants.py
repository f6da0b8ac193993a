"""FoldConstants: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import helper

from slimship.exporters.onnx_passes import FoldConstants
from tests.exporters.onnx_passes.helpers import init, make_model, ops, surgery_keeps_numerics, value


def test_fold_constants(tmp_path):
    model = make_model(
        [helper.make_node("Add", ["c1", "c2"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])],
        [value("x", [3])],
        [value("y", [3])],
        [init("c1", np.array([1, 2, 3], np.float32)), init("c2", np.array([0.5, 0.5, 0.5], np.float32))],
    )
    new, report = surgery_keeps_numerics(model, [FoldConstants()], [np.ones(3, np.float32)], tmp_path)
    assert ops(new) == ["Mul"] and report.changes["fold_constants"] == 1
