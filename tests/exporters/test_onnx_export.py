"""export_onnx end to end: names, dynamic batch, metadata, parity, errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from slimship import slim, zero_random_groups
from slimship._util import sha256_file, to_jsonable
from slimship.errors import ExportError, ModelFileError
from slimship.exporters import export_onnx, load_onnx, onnx_parity
from slimship.exporters import onnx_export as onnx_export_module
from slimship.exporters.onnx_export import checked_surgery, ort_outputs, surgery_cases
from slimship.exporters.onnx_passes import AddMetadata, Pass, RemoveIdentity, default_passes
from slimship.runtimes.device_runner import open_runner
from tests.exporters.conftest import ConvBNNet, TwoInTwoOut, randomized_bn
from tests.exporters.layouts import LAYOUTS, build


@pytest.fixture(scope="module")
def cnn_export(cnn, cnn_input, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    summary = {"removed_channels": 5, "spaces": ["conv1"]}
    return export_onnx(cnn, cnn_input, path, metadata={"slimming_summary": summary})


def test_cnn_export_file_names_and_metadata(cnn_export, cnn, cnn_input):
    result = cnn_export
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    assert result.sha256 == sha256_file(result.path) and result.bytes == result.path.stat().st_size
    assert result.exporter == "dynamo" and result.fallback_reason is None and result.opset == 18
    assert [s.name for s in result.inputs] == ["input"] and [s.name for s in result.outputs] == ["output"]
    assert result.inputs[0].shape[0] == "batch" and result.dynamic_batch
    props = {p.key: p.value for p in model.metadata_props}
    assert props["slimship_version"] and len(props["source_model_sha256"]) == 64
    assert json.loads(props["slimming_summary"]) == {"removed_channels": 5, "spaces": ["conv1"]}
    assert not {"BatchNormalization", "Dropout", "Identity"} & {n.op_type for n in model.graph.node}
    assert result.parity.passed and "random_batch" in result.parity.cases
    assert json.loads(json.dumps(to_jsonable(result)))["parity"]["passed"] is True


def test_cnn_export_runs_other_batch_sizes(cnn_export, cnn):
    x = torch.randn(5, 3, 16, 16)
    (out,) = open_runner(str(cnn_export.path)).run([x.numpy()])
    with torch.no_grad():
        ref = cnn(x).numpy()
    assert np.max(np.abs(out - ref)) <= 1e-4 * max(1.0, np.abs(ref).max())


def test_source_hash_follows_weights(cnn, cnn_input, cnn_export, tmp_path):
    other = randomized_bn(ConvBNNet(), seed=3)
    result = export_onnx(other, cnn_input, tmp_path / "other.onnx", surgery=False)
    assert result.metadata["source_model_sha256"] != cnn_export.metadata["source_model_sha256"]
    assert result.surgery is None and result.parity.passed
    # parity against the wrong PyTorch model must fail: the check is not vacuous
    assert not onnx_parity(cnn, result.path, cnn_input).passed


def test_graph_module_from_torch_export_keeps_dynamic_batch(cnn, cnn_input, tmp_path):
    module = torch.export.export(cnn, cnn_input).module()
    result = export_onnx(module, cnn_input, tmp_path / "gm.onnx")
    assert result.dynamic_batch and result.inputs[0].shape[0] == "batch"
    assert result.parity.passed


def test_two_inputs_two_outputs_user_names(tmp_path):
    torch.manual_seed(0)
    model = TwoInTwoOut().eval()
    args = (torch.randn(3, 6), torch.randn(3, 3))
    result = export_onnx(
        model, args, tmp_path / "two.onnx", input_names=["feat", "aux"], output_names=["h", "score"],
        dynamic_batch=False, check_inputs=[(torch.randn(3, 6), torch.randn(3, 3))],
    )  # fmt: skip
    assert [s.name for s in result.inputs] == ["feat", "aux"] and [s.name for s in result.outputs] == [
        "h",
        "score",
    ]
    assert result.inputs[0].shape == [3, 6] and not result.dynamic_batch
    assert "check_0" in result.parity.cases and result.parity.passed
    h, score = open_runner(str(result.path)).run([a.numpy() for a in args])
    ref_h, ref_score = model(*args)
    np.testing.assert_allclose(h, ref_h.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score, ref_score.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_default_names_with_several_outputs(tmp_path):
    model = TwoInTwoOut().eval()
    result = export_onnx(model, (torch.randn(2, 6), torch.randn(2, 3)), tmp_path / "d.onnx")
    assert [s.name for s in result.inputs] == ["input", "input_1"]
    assert [s.name for s in result.outputs] == ["output", "output_1"]


def test_bad_names_and_opset(cnn, cnn_input, tmp_path):
    with pytest.raises(ExportError, match="input_names"):
        export_onnx(cnn, cnn_input, tmp_path / "x.onnx", input_names=["a", "b"])
    with pytest.raises(ExportError, match="opset"):
        export_onnx(cnn, cnn_input, tmp_path / "x.onnx", opset=13)


@torch.library.custom_op("slimship_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2


@wobble.register_fake
def _(x):
    return torch.empty_like(x)


class UsesCustomOp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return wobble(self.lin(x)) + 1  # the line the error must point at


def test_unsupported_op_names_op_node_and_line(tmp_path):
    with pytest.raises(ExportError) as info:
        export_onnx(UsesCustomOp().eval(), (torch.randn(2, 4),), tmp_path / "bad.onnx")
    message = str(info.value)
    assert "slimship_test::wobble" in message and "graph node 'wobble'" in message
    assert "test_onnx_export.py" in message and "Way out" in message
    assert not (tmp_path / "bad.onnx").exists()


def test_corrupt_and_truncated_onnx_files(cnn_export, cnn, cnn_input, tmp_path):
    data = cnn_export.path.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    for bad in (truncated, garbage, tmp_path / "missing.onnx"):
        with pytest.raises(ModelFileError, match=bad.name):
            onnx_parity(cnn, bad, cnn_input)
        with pytest.raises(ModelFileError):
            load_onnx(bad)


def _with_nan_initializer(source, dest, name_part: str) -> str:
    """Copy an .onnx file with every value of the first initializer named like `name_part` set to NaN."""
    model = onnx.load(str(source))
    init = next(t for t in model.graph.initializer if name_part in t.name)
    values = onnx.numpy_helper.to_array(init)
    init.CopyFrom(onnx.numpy_helper.from_array(np.full_like(values, np.nan), init.name))
    onnx.save(model, str(dest))
    return init.name


def test_parity_fails_when_the_onnx_file_outputs_nan(cnn_export, cnn, cnn_input, tmp_path):
    """An all-NaN output used to pass: max(0.0, nan) is 0.0."""
    bad = tmp_path / "nan.onnx"
    _with_nan_initializer(cnn_export.path, bad, "fc.bias")
    parity = onnx_parity(cnn, bad, cnn_input)
    assert not parity.passed
    assert np.isinf(parity.max_abs_diff)
    assert "NaN at 20 positions where the reference is a number" in parity.reason  # 2 rows x 10 classes


def test_export_raises_when_onnxruntime_gives_nan(cnn, cnn_input, tmp_path, monkeypatch):
    from slimship.errors import VerificationError
    from slimship.exporters import onnx_export

    real_run = onnx_export._run

    def nan_in_first_output(runner, arrays):
        outputs = real_run(runner, arrays)
        outputs[0] = np.where(np.arange(outputs[0].size).reshape(outputs[0].shape) == 3, np.nan, outputs[0])
        return outputs

    monkeypatch.setattr(onnx_export, "_run", nan_in_first_output)
    with pytest.raises(VerificationError, match=r"NaN at \d+ positions where the reference is a number"):
        export_onnx(cnn, cnn_input, tmp_path / "cnn.onnx", surgery=False)


class SqrtHead(torch.nn.Module):
    """NaN wherever the linear output is negative, in PyTorch and onnxruntime alike."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x))


def test_export_passes_when_nan_positions_match(tmp_path):
    torch.manual_seed(0)
    model, x = SqrtHead().eval(), torch.randn(4, 6)
    assert torch.isnan(model(x)).any() and not torch.isnan(model(x)).all()
    result = export_onnx(model, x, tmp_path / "sqrt.onnx")
    assert result.parity.passed and np.isfinite(result.parity.max_abs_diff)


@pytest.mark.parametrize(
    ("dtype", "op", "expected"),
    [
        (np.float32, "Identity", "fp32"),
        (np.float16, "Identity", "fp16"),
        (np.int8, "DequantizeLinear", "int8-dynamic"),
        (np.int8, "QuantizeLinear", "int8"),
    ],
)
def test_onnx_precision_is_read_from_the_initializers(tmp_path, dtype, op, expected):
    from onnx import helper, numpy_helper

    from slimship.exporters.onnx_export import onnx_precision

    weight = numpy_helper.from_array(np.ones((2, 2), dtype=dtype), "w")
    graph = helper.make_graph(
        [helper.make_node(op, ["w"], ["y"])], "g", [], [helper.make_tensor_value_info("y", 1, None)], [weight]
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert onnx_precision(path) == expected


# ---------------------------------------------------------------- a pass that breaks the graph is left out


class Drifts(Pass):
    """Changes the numbers: adds 0.1 to every float constant (a wrong fusion would look like this)."""

    name = "drifts"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for tensor in graph.tensors().values():
            if (
                isinstance(tensor, gs.Constant)
                and tensor.values.dtype == np.float32
                and not tensor.name.endswith("+")
            ):
                tensor.values, tensor.name = tensor.values + 0.1, tensor.name + "+"
                self.last_changes += 1
        return self.last_changes > 0


class GrowsRank(Pass):
    """Turns scalars into one-element vectors (the old DeduplicateConstants bug): fails shape inference."""

    name = "grows_rank"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for tensor in graph.tensors().values():
            if isinstance(tensor, gs.Constant) and tensor.values.shape == ():
                tensor.values = tensor.values.reshape(1)
                self.last_changes += 1
        return self.last_changes > 0


class Raises(Pass):
    name = "raises"

    def run(self, graph: gs.Graph) -> bool:
        raise RuntimeError("boom")


def _class_token_head() -> onnx.ModelProto:
    """Identity -> x[:, 0] (Gather, scalar index) -> Gemm: a ViT head."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["a"]),
            helper.make_node("Gather", ["a", "cls"], ["t"], axis=1),
            helper.make_node("Gemm", ["t", "w", "b"], ["y"], transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [
            numpy_helper.from_array(np.array(0, np.int64), "cls"),
            numpy_helper.from_array(np.array([[0.5, -1.0, 2.0], [1.5, 0.0, -0.5]], np.float32), "w"),
            numpy_helper.from_array(np.array([0.25, -0.25], np.float32), "b"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_checked_surgery_leaves_out_each_breaking_pass(caplog):
    model = _class_token_head()
    cases = {"example": [np.arange(24, dtype=np.float32).reshape(2, 4, 3)]}
    passes = [RemoveIdentity(), GrowsRank(), Drifts(), Raises(), AddMetadata({"k": "v"})]
    with caplog.at_level(logging.WARNING, logger="slimship.exporters.onnx_export"):
        new, report, skipped = checked_surgery(model, passes, cases)
    assert [s.name for s in skipped] == ["grows_rank", "drifts", "raises"]
    assert skipped[0].reason.startswith("onnx.checker / shape inference") and "Gemm" in skipped[0].reason
    assert skipped[1].reason.startswith("outputs differ from the graph before surgery")
    assert "RuntimeError: boom" in skipped[2].reason
    onnx.checker.check_model(new, full_check=True)
    np.testing.assert_array_equal(ort_outputs(new, [*cases.values()]), ort_outputs(model, [*cases.values()]))
    assert [n.op_type for n in new.graph.node] == ["Gather", "Gemm"]  # the sound passes still ran
    assert {p.key: p.value for p in new.metadata_props} == {"k": "v"}
    assert report.changes["remove_identity"] == 1 and "drifts" not in report.changes
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 3 and "'grows_rank'" in left_out[0]


def test_checked_surgery_on_a_sound_pipeline_skips_nothing():
    model = _class_token_head()
    _, report, skipped = checked_surgery(
        model, default_passes({"k": "v"}), {"x": [np.ones((5, 4, 3), np.float32)]}
    )
    assert skipped == [] and report.changes["remove_identity"] == 1


class FreezesBatch(Pass):
    """Replaces Shape(x) by the example's shape [2, 3]: right at batch 2, wrong at any other batch."""

    name = "freezes_batch"

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        for node in [n for n in graph.nodes if n.op == "Shape" and n.outputs]:
            const = gs.Constant("frozen_shape", np.array([2, 3], np.int64))
            for consumer in list(node.outputs[0].outputs):
                consumer.inputs[consumer.inputs.index(node.outputs[0])] = const
            node.outputs.clear()
            self.last_changes += 1
        return self.last_changes > 0


def test_checked_surgery_catches_a_pass_that_fixes_the_batch():
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node(
                "ConstantOfShape", ["s"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32))
            ),
            helper.make_node("Add", ["x", "ones"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    example = (torch.randn(2, 3),)
    _, _, skipped = checked_surgery(model, [FreezesBatch()], surgery_cases(example, dynamic=False))
    assert skipped == []  # at the example's batch the frozen shape is right ...
    new, _, skipped = checked_surgery(model, [FreezesBatch()], surgery_cases(example, dynamic=True))
    assert [s.name for s in skipped] == ["freezes_batch"]  # ... at batch 3 it is not
    assert "Shape" in [n.op_type for n in new.graph.node]


def test_export_drops_a_breaking_pass_not_the_export(cnn, cnn_input, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(onnx_export_module, "default_passes", lambda meta: [*default_passes(meta), Drifts()])
    with caplog.at_level(logging.WARNING, logger="slimship.exporters.onnx_export"):
        result = export_onnx(cnn, cnn_input, tmp_path / "cnn.onnx")
    assert [s.name for s in result.skipped_passes] == ["drifts"] and "differ" in result.skipped_passes[
        0
    ].reason
    assert result.parity.passed and sorted(result.surgery.changes) == sorted(
        p.name for p in default_passes({"k": "v"})
    )
    assert any("'drifts' left out" in r.getMessage() for r in caplog.records)
    assert json.loads(json.dumps(to_jsonable(result)))["skipped_passes"][0]["name"] == "drifts"


class MemorisesInput(Pass):
    """Replaces the graph input by the example's values: right on the example, wrong on any other input."""

    name = "memorises_input"

    def __init__(self, example: np.ndarray) -> None:
        super().__init__()
        self.example = example

    def run(self, graph: gs.Graph) -> bool:
        self.last_changes = 0
        (x,) = graph.inputs
        if x.outputs:
            const = gs.Constant("memorised", self.example)
            for consumer in list(x.outputs):
                consumer.inputs[consumer.inputs.index(x)] = const
            self.last_changes = 1
        return self.last_changes > 0


def test_surgery_that_fails_pytorch_parity_falls_back_to_no_surgery(
    cnn, cnn_input, tmp_path, monkeypatch, caplog
):
    memorise = MemorisesInput(cnn_input[0].numpy())
    monkeypatch.setattr(onnx_export_module, "default_passes", lambda meta: [*default_passes(meta), memorise])
    with caplog.at_level(logging.WARNING, logger="slimship.exporters.onnx_export"):
        result = export_onnx(cnn, cnn_input, tmp_path / "cnn.onnx", dynamic_batch=False)
    assert result.parity.passed and result.surgery is None and "random_0" in result.parity.cases
    assert "memorises_input" in [s.name for s in result.skipped_passes]
    assert all(s.reason.startswith("PyTorch parity") for s in result.skipped_passes)
    assert any("exporting it without surgery" in r.getMessage() for r in caplog.records)
    model = onnx.load(str(result.path))
    assert (
        "memorised" not in {i.name for i in model.graph.initializer} and model.graph.input[0].name == "input"
    )
    (out,) = open_runner(str(result.path)).run([np.ones((2, 3, 16, 16), np.float32)])
    np.testing.assert_allclose(out, cnn(torch.ones(2, 3, 16, 16)).detach().numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- dynamic batch: kept, or why not


class LiteralBatch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, 12))  # the batch size written as a literal


def test_literal_batch_is_static_with_one_line_why(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="slimship.exporters.onnx_export"):
        result = export_onnx(LiteralBatch().eval(), (torch.randn(2, 3, 4),), tmp_path / "lit.onnx")
    assert not result.dynamic_batch and result.inputs[0].shape == [2, 3, 4]
    assert "fixes the batch size to 2" in result.dynamic_batch_reason
    lines = [r.getMessage() for r in caplog.records if "static batch" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and result.dynamic_batch_reason in lines[0]
    assert result.parity.passed and "random_batch" not in result.parity.cases


@pytest.mark.slow  # two torch.export attempts of a Swin: ~15 s
def test_int_of_a_shape_fixes_swin_batch_with_one_line_why(tmp_path, caplog):
    model, (x,) = build("swin_int_batch")
    with caplog.at_level(logging.WARNING, logger="slimship.exporters.onnx_export"):
        result = export_onnx(model, (x,), tmp_path / "swin.onnx")
    assert not result.dynamic_batch and f"batch size to {x.shape[0]}" in result.dynamic_batch_reason
    assert [r.getMessage() for r in caplog.records if "static batch" in r.getMessage()] == [
        f"ONNX export keeps a static batch of {x.shape[0]}: {result.dynamic_batch_reason}"
    ]
    assert result.parity.passed and result.skipped_passes == [] and result.inputs[0].shape[0] == x.shape[0]


def test_static_batch_asked_for_says_so(tmp_path):
    model = TwoInTwoOut().eval()
    result = export_onnx(
        model, (torch.randn(2, 6), torch.randn(2, 3)), tmp_path / "s.onnx", dynamic_batch=False
    )
    assert not result.dynamic_batch and "dynamic_batch=False" in result.dynamic_batch_reason


# ------------------------------------------------------------ outside layouts: ViT, DeiT, Swin, PoolFormer


def _check_layout_export(result, model, x) -> None:
    assert result.skipped_passes == [] and result.surgery.changes["deduplicate_constants"] >= 0
    assert result.parity.passed and "random_batch" in result.parity.cases
    assert (
        result.dynamic_batch and result.dynamic_batch_reason is None and result.inputs[0].shape[0] == "batch"
    )
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    bigger = torch.randn(x.shape[0] + 3, *x.shape[1:], generator=torch.Generator().manual_seed(7))
    (out,) = open_runner(str(result.path)).run([bigger.numpy()])
    with torch.no_grad():
        ref = model(bigger).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_exports_with_surgery(name, tmp_path):
    model, (x,) = build(name)
    result = export_onnx(model, (x,), tmp_path / f"{name}.onnx")
    _check_layout_export(result, model, x)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_slimmed_layout_exports_with_surgery(name, tmp_path):
    model, (x,) = build(name)
    assert zero_random_groups(model, (x,), fraction=0.4, seed=1) > 0
    slimmed = slim(model, (x,))
    assert slimmed.params_after < slimmed.params_before and not slimmed.report.excluded_spaces
    result = export_onnx(slimmed.model, (x,), tmp_path / f"{name}-slim.onnx")
    _check_layout_export(result, model, x)
