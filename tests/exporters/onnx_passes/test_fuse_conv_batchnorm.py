"""FuseConvBatchNorm: on small hand-built ONNX graphs, with numerics kept."""

from __future__ import annotations

import numpy as np
from onnx import helper

from slimship.exporters.onnx_passes import FuseConvBatchNorm, RemoveUnusedInitializers, run_surgery
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def test_fuse_conv_batchnorm(tmp_path):
    c = 4
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["a"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["y"], epsilon=1e-3),
        ],
        [value("x", [1, 3, 6, 6])],
        [value("y", [1, c, 6, 6])],
        [
            init("w", RNG.standard_normal((c, 3, 3, 3)).astype(np.float32)),
            init("b", RNG.standard_normal(c).astype(np.float32)),
            init("s", (RNG.random(c) + 0.5).astype(np.float32)),
            init("bb", RNG.standard_normal(c).astype(np.float32)),
            init("m", RNG.standard_normal(c).astype(np.float32)),
            init("v", (RNG.random(c) + 0.5).astype(np.float32)),
        ],
    )
    new, report = surgery_keeps_numerics(
        model,
        [FuseConvBatchNorm(), RemoveUnusedInitializers()],
        [RNG.standard_normal((1, 3, 6, 6), np.float32)],
        tmp_path,
    )
    assert ops(new) == ["Conv"]
    assert report.changes["fuse_conv_batchnorm"] == 1
    assert len(new.graph.initializer) == 2


def test_conv_feeding_two_consumers_is_not_fused():
    c = 2
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["a"]),
            helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["y"]),
            helper.make_node("Relu", ["a"], ["z"]),
        ],
        [value("x", [1, 1, 3, 3])],
        [value("y", [1, 2, 3, 3]), value("z", [1, 2, 3, 3])],
        [init("w", np.ones((c, 1, 1, 1), np.float32))]
        + [init(n, np.ones(c, np.float32)) for n in ("s", "bb", "m", "v")],
    )
    new, _ = run_surgery(model, [FuseConvBatchNorm()])
    assert "BatchNormalization" in ops(new)


def test_fuse_into_a_conv_without_bias_gives_it_one(tmp_path):
    c = 2
    model = make_model(
        [
            helper.make_node("Conv", ["x", "w"], ["a"]),
            helper.make_node("BatchNormalization", ["a", "s", "bb", "m", "v"], ["n"]),
            helper.make_node("Relu", ["n"], ["y"]),
        ],
        [value("x", [1, 1, 3, 3])],
        [value("y", [1, c, 3, 3])],
        [
            init("w", RNG.standard_normal((c, 1, 1, 1)).astype(np.float32)),
            init("s", (RNG.random(c) + 0.5).astype(np.float32)),
            init("bb", RNG.standard_normal(c).astype(np.float32)),
            init("m", RNG.standard_normal(c).astype(np.float32)),
            init("v", (RNG.random(c) + 0.5).astype(np.float32)),
        ],
    )
    feeds = [RNG.standard_normal((1, 1, 3, 3), np.float32)]
    new, report = surgery_keeps_numerics(model, [FuseConvBatchNorm()], feeds, tmp_path)
    assert ops(new) == ["Conv", "Relu"] and len(new.graph.node[0].input) == 3
    assert report.changes["fuse_conv_batchnorm"] == 1
