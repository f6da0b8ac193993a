"""export_tflite variants, NHWC IO, compatibility report, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship._util import sha256_file
from slimship.errors import ExportError, ModelFileError, TargetError
from slimship.exporters import export_tflite, read_ops, tflite_compatibility, tflite_parity
from tests.exporters.test_onnx_export import UsesCustomOp
from tests.parallel import machine_lock


@pytest.fixture(scope="module")
def eval_batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(2, 3, 16, 16, generator=gen),) for _ in range(4)]


@pytest.fixture(scope="module")
def exports(cnn, cnn_input, eval_batches, tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite")
    made = {}
    for variant, nhwc in (
        ("fp32", False),
        ("fp32", True),
        ("fp16", False),
        ("int8-dynamic", False),
        ("int8", False),
    ):
        made[(variant, nhwc)] = export_tflite(
            cnn, cnn_input, out / f"{variant}-{nhwc}.tflite", variant=variant, nhwc=nhwc,
            calibration=eval_batches if variant == "int8" else None, eval_batches=eval_batches,
        )  # fmt: skip
    return made


@pytest.fixture(scope="module")
def edge_python():
    from slimship.runtimes.edge_env import ensure_edge_python

    try:
        with machine_lock("edge-venv"):  # built once into ~/.cache: a parallel worker may be building it
            return ensure_edge_python()
    except TargetError as exc:
        pytest.skip(f"edge environment unavailable: {exc}")


def test_fp32_parity_and_record(exports):
    result = exports[("fp32", False)]
    assert result.parity.passed and result.parity.rel_bound == 1e-4
    assert result.parity.top1_agreement == 1.0
    assert {"random_0", "random_1"} <= set(result.parity.cases)
    assert result.sha256 == sha256_file(result.path) and result.bytes == result.path.stat().st_size
    assert result.inputs[0].shape == [2, 3, 16, 16] and result.inputs[0].dtype == "float32"
    assert result.ops == read_ops(result.path) and result.ops["CONV_2D"] == 2


def test_variants_shrink_the_file_and_use_their_kernels(exports):
    fp32, fp16 = exports[("fp32", False)], exports[("fp16", False)]
    dyn, full = exports[("int8-dynamic", False)], exports[("int8", False)]
    assert fp16.bytes < fp32.bytes and dyn.bytes < fp16.bytes and full.bytes < fp32.bytes
    assert fp16.ops.get("DEQUANTIZE", 0) >= 3  # fp16 weights dequantized for float kernels
    assert dyn.inputs[0].dtype == "float32" and full.inputs[0].dtype == "int8"
    assert full.calibration_batches == 4
    for result in (fp16, dyn, full):
        assert result.parity.passed and result.parity.top1_agreement is not None
        assert 0 < result.parity.max_abs_diff <= result.parity.tolerance


def test_nhwc_inputs(exports, cnn, cnn_input):
    nchw, nhwc = exports[("fp32", False)], exports[("fp32", True)]
    assert nhwc.nhwc and nhwc.inputs[0].shape == [2, 16, 16, 3]
    assert nhwc.ops.get("TRANSPOSE", 0) < nchw.ops.get("TRANSPOSE", 0)
    from slimship.exporters.common import open_model_runner

    (out,) = open_model_runner(nhwc.path).run([cnn_input[0].permute(0, 2, 3, 1).contiguous().numpy()])
    ref = cnn(*cnn_input).detach().numpy()
    assert np.max(np.abs(out - ref)) <= 1e-4 * max(1.0, np.abs(ref).max())
    # feeding NCHW-ordered data reshaped to NHWC must not match: the layout is really channel-last
    (wrong,) = open_model_runner(nhwc.path).run([cnn_input[0].numpy().reshape(2, 16, 16, 3)])
    assert np.max(np.abs(wrong - ref)) > 1e-3


def test_parity_detects_a_different_model(exports, cnn_input):
    from tests.exporters.conftest import ConvBNNet, randomized_bn

    other = randomized_bn(ConvBNNet(), seed=5)
    assert not tflite_parity(other, exports[("fp32", False)].path, cnn_input).passed


def test_compat_report_in_process_and_edge(exports, cnn, cnn_input, edge_python):
    result = exports[("fp32", False)]
    reference = [cnn(*cnn_input).detach().numpy()]
    report = tflite_compatibility(result.path, inputs=[cnn_input[0].numpy()], reference=reference)
    assert report.ops == result.ops and report.sha256 == result.sha256
    by_name = {r.interpreter: r for r in report.results}
    assert by_name["litert"].ran and by_name["litert"].parity.passed
    assert by_name["tflite_runtime"].version == "2.14.0"
    assert by_name["tflite_runtime"].ran and by_name["tflite_runtime"].parity.passed
    assert report.compatible


def test_compat_report_int8_across_runtimes(exports, edge_python):
    report = tflite_compatibility(exports[("int8", False)].path)
    assert [r.interpreter for r in report.results] == ["litert", "tflite_runtime"]
    litert, edge = report.results
    assert litert.ran and litert.parity.max_abs_diff == 0.0  # baseline: compared with itself
    # either it runs there within 2 quantization steps, or the report says why it does not
    assert (edge.ran and edge.parity is not None) or edge.error
    assert report.compatible == (edge.ran and edge.parity.passed)


def test_damaged_tflite_files(exports, cnn, cnn_input, tmp_path):
    data = exports[("fp32", False)].path.read_bytes()
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x01" * 64)
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty, tmp_path / "missing.tflite"):
        with pytest.raises(ModelFileError, match=bad.name):
            tflite_compatibility(bad, interpreters=("litert",))
        with pytest.raises(ModelFileError):
            tflite_parity(cnn, bad, cnn_input)


def test_unsupported_op_and_bad_options(cnn, cnn_input, tmp_path):
    with pytest.raises(ExportError) as info:
        export_tflite(UsesCustomOp().eval(), (torch.randn(2, 4),), tmp_path / "bad.tflite")
    assert "slimship_test::wobble" in str(info.value) and "graph node 'wobble'" in str(info.value)
    with pytest.raises(ExportError, match="variant"):
        export_tflite(cnn, cnn_input, tmp_path / "x.tflite", variant="int4")
    with pytest.raises(ExportError, match="4-D"):
        export_tflite(UsesCustomOp().eval(), (torch.randn(2, 4),), tmp_path / "x.tflite", nhwc=True)


def test_precision_is_read_from_the_file(exports):
    """verify picks its bound from what the file is, not from a role name the manifest could change."""
    from slimship.exporters.tflite_compat import tflite_precision

    for variant in ("fp32", "fp16", "int8-dynamic", "int8"):
        assert tflite_precision(exports[(variant, False)].path) == variant
