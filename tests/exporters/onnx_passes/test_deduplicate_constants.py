"""DeduplicateConstants: onnx-ir's initializer deduplication, without its size limit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from slimship.exporters.onnx_passes import DeduplicateConstants, RemoveUnusedInitializers, run_surgery
from slimship.runtimes.device_runner import open_runner
from tests.exporters.onnx_passes.helpers import RNG, init, make_model, ops, surgery_keeps_numerics, value


def _two_equal_weights(n: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "w2"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])],
        [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_merges_equal_weights_above_onnx_irs_default_limit(tmp_path):
    model = _two_equal_weights(4096)  # onnx-ir's own pass skips tensors over 1024 elements by default
    new, report = run_surgery(model, [DeduplicateConstants()])
    onnx.checker.check_model(new, full_check=True)
    assert len(new.graph.initializer) == 1 and report.changes == {"deduplicate_constants": 1}
    x = np.linspace(-1, 1, 4096, dtype=np.float32)
    outputs = []
    for tag, m in (("before", model), ("after", new)):
        path = tmp_path / f"{tag}.onnx"
        path.write_bytes(m.SerializeToString())
        outputs.append(open_runner(str(path)).run([x])[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_keeps_different_weights_apart():
    model = _two_equal_weights(8)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones(8, np.float32), "w2"))
    result = DeduplicateConstants()(ir.serde.deserialize_model(model))
    assert not result.modified and len(result.model.graph.initializers) == 2


def test_deduplicate_and_remove_unused_initializers(tmp_path):
    w = RNG.standard_normal(8).astype(np.float32)
    model = make_model(
        [helper.make_node("Add", ["x", "w1"], ["a"]), helper.make_node("Mul", ["a", "w2"], ["y"])],
        [value("x", [8])],
        [value("y", [8])],
        [init("w1", w), init("w2", w.copy()), init("unused", np.zeros(16, np.float32))],
    )
    new, report = surgery_keeps_numerics(
        model,
        [RemoveUnusedInitializers(), DeduplicateConstants()],
        [RNG.standard_normal(8).astype(np.float32)],
        tmp_path,
    )
    assert len(new.graph.initializer) == 1
    assert report.changes == {"remove_unused_initializers": 1, "deduplicate_constants": 1}
    assert report.bytes_after < report.bytes_before


# Each case below puts a scalar and a one-element vector with the same bytes in one graph, the vector's
# name sorting first: merging them changed the rank of what the scalar feeds (issue #18, outside zoos).


def test_dedup_keeps_scalar_gather_index_before_gemm(tmp_path):
    """ViT / DeiT head: Gemm on the class token x[:, 0], a Gather with a scalar index on 3-D tokens."""
    model = make_model(
        [
            helper.make_node("Gather", ["x", "a_first"], ["col"], axis=2),
            helper.make_node("Gather", ["x", "z_cls"], ["cls"], axis=1),
            helper.make_node("Gemm", ["cls", "w", "b"], ["y"], transB=1),
        ],
        [value("x", ["B", 5, 4])],
        [value("y", ["B", 3]), value("col", ["B", 5, 1])],
        [
            init("a_first", np.array([0], np.int64)),
            init("z_cls", np.array(0, np.int64)),
            init("w", RNG.standard_normal((3, 4)).astype(np.float32)),
            init("b", RNG.standard_normal(3).astype(np.float32)),
        ],
    )
    feeds = [RNG.standard_normal((2, 5, 4), np.float32)]
    new, report = surgery_keeps_numerics(model, [DeduplicateConstants()], feeds, tmp_path)
    assert ops(new) == ops(model) and report.changes["deduplicate_constants"] == 0


def test_dedup_keeps_rank_of_transposed_window(tmp_path):
    """Swin: a Transpose whose perm length is the rank of a Gather result (rank set by a scalar index)."""
    model = make_model(
        [
            helper.make_node("Gather", ["x", "a_row"], ["rows"], axis=0),
            helper.make_node("Gather", ["x", "z_one"], ["win"], axis=0),
            helper.make_node("Transpose", ["win"], ["y"], perm=[1, 0]),
        ],
        [value("x", [2, 3, 4])],
        [value("y", [4, 3]), value("rows", [1, 3, 4])],
        [init("a_row", np.array([1], np.int64)), init("z_one", np.array(1, np.int64))],
    )
    feeds = [RNG.standard_normal((2, 3, 4), np.float32)]
    new, _ = surgery_keeps_numerics(model, [DeduplicateConstants()], feeds, tmp_path)
    assert ops(new) == ops(model)


def test_dedup_keeps_instance_norm_scale_a_vector(tmp_path):
    """PoolFormer's GroupNorm(1, C) lowering: InstanceNormalization on [N, 1, -1] with scale [1.0] and
    bias [0.0], next to a scalar 1.0 (GELU's constant) that sorts first."""
    model = make_model(
        [
            helper.make_node("Reshape", ["x", "grouped"], ["g"]),
            helper.make_node("InstanceNormalization", ["g", "v_scale", "v_bias"], ["n"], epsilon=1e-5),
            helper.make_node("Reshape", ["n", "full"], ["r"]),
            helper.make_node("Add", ["r", "a_one"], ["y"]),
        ],
        [value("x", [2, 3, 4, 4])],
        [value("y", [2, 3, 4, 4])],
        [
            init("grouped", np.array([2, 1, -1], np.int64)),
            init("full", np.array([2, 3, 4, 4], np.int64)),
            init("a_one", np.array(1.0, np.float32)),
            init("v_scale", np.array([1.0], np.float32)),
            init("v_bias", np.array([0.0], np.float32)),
        ],
    )
    feeds = [RNG.standard_normal((2, 3, 4, 4), np.float32)]
    new, _ = surgery_keeps_numerics(model, [DeduplicateConstants()], feeds, tmp_path)
    assert ops(new) == ops(model)


def test_dedup_still_merges_equal_scalars(tmp_path):
    model = make_model(
        [helper.make_node("Add", ["x", "s1"], ["a"]), helper.make_node("Mul", ["a", "s2"], ["y"])],
        [value("x", [3])],
        [value("y", [3])],
        [init("s1", np.array(2.0, np.float32)), init("s2", np.array(2.0, np.float32))],
    )
    new, report = surgery_keeps_numerics(
        model, [DeduplicateConstants(), RemoveUnusedInitializers()], [np.ones(3, np.float32)], tmp_path
    )
    assert report.changes["deduplicate_constants"] == 1 and len(new.graph.initializer) == 1
    assert numpy_helper.to_array(new.graph.initializer[0]).shape == ()
