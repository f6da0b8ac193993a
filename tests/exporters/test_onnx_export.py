"""export_onnx end to end: names, dynamic batch, metadata, parity, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from slimship._util import sha256_file, to_jsonable
from slimship.errors import ExportError, ModelFileError
from slimship.exporters import export_onnx, load_onnx, onnx_parity
from slimship.runtimes.device_runner import open_runner
from tests.exporters.conftest import ConvBNNet, TwoInTwoOut, randomized_bn


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
