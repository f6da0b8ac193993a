"""Each surgery pass on a small hand-built ONNX graph that has its pattern, with numerics kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimship.errors import ExportError
from slimship.exporters.onnx_passes import (
    AddMetadata,
    DeduplicateConstants,
    FoldCastLike,
    FoldConstants,
    FuseConvBatchNorm,
    Pass,
    RemoveIdentity,
    RemoveNoOpCast,
    RemoveNoOpReshape,
    RemoveUnusedInitializers,
    SimplifyShapeOps,
    run_surgery,
)
from slimship.runtimes.device_runner import open_runner

RNG = np.random.default_rng(0)


def make_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def value(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, array: np.ndarray):
    return numpy_helper.from_array(np.asarray(array), name)


def run(model: onnx.ModelProto, feeds: list[np.ndarray], tmp_path, tag: str) -> list[np.ndarray]:
    path = tmp_path / f"{tag}.onnx"
    path.write_bytes(model.SerializeToString())
    return open_runner(str(path)).run(feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def surgery_keeps_numerics(model, passes, feeds, tmp_path):
    new, report = run_surgery(model, passes)
    onnx.checker.check_model(new, full_check=True)
    before = run(model, feeds, tmp_path, "before")
    after = run(new, feeds, tmp_path, "after")
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [o.name for o in new.graph.output] == [o.name for o in model.graph.output]
    return new, report


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


def test_fold_constants(tmp_path):
    model = make_model(
        [helper.make_node("Add", ["c1", "c2"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])],
        [value("x", [3])],
        [value("y", [3])],
        [init("c1", np.array([1, 2, 3], np.float32)), init("c2", np.array([0.5, 0.5, 0.5], np.float32))],
    )
    new, report = surgery_keeps_numerics(model, [FoldConstants()], [np.ones(3, np.float32)], tmp_path)
    assert ops(new) == ["Mul"] and report.changes["fold_constants"] == 1


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


def test_metadata_pass_is_idempotent():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    model.metadata_props.add(key="keep", value="me")
    meta = AddMetadata({"slimship_version": "1", "summary": '{"a": 1}'})
    new, report = run_surgery(model, [meta])
    assert {p.key: p.value for p in new.metadata_props} == {
        "keep": "me",
        "slimship_version": "1",
        "summary": '{"a": 1}',
    }
    assert report.changes["add_metadata"] == 2 and report.iterations == 2 and report.converged
    assert not meta(ir.serde.deserialize_model(new)).modified


class AlwaysChanges(Pass):
    name = "always"
    level = "model"

    def run(self, model):
        self.last_changes = 1
        return True


class Broken(Pass):
    name = "broken"

    def run(self, graph):
        raise RuntimeError("boom")


def test_manager_is_bounded_and_reports_failing_pass():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    _, report = run_surgery(model, [AlwaysChanges()], max_iterations=3)
    assert report.iterations == 3 and not report.converged and report.changes["always"] == 3
    with pytest.raises(ExportError, match="broken"):
        run_surgery(model, [Broken()])


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
