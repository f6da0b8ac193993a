"""ExecuTorch export (XNNPACK delegate, fp32 and int8): parity, dynamic batch, runner, registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimship.errors import ExportError, ModelFileError
from slimship.exporters.common import open_model_runner
from slimship.exporters.executorch_export import executorch_available, executorch_parity, export_executorch
from slimship.exporters.registry import FORMATS, ExportRequest, family_of, get_format
from slimship.runtimes.registry import RUNTIMES, runtimes_for_suffix

pytestmark = pytest.mark.skipif(not executorch_available(), reason="executorch is not installed")


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(2, 3, 16, 16, generator=gen),) for _ in range(6)]


@pytest.fixture(scope="module")
def programs(cnn, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("executorch")
    example = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
    request = ExportRequest(cnn, example[:1], example, calibration=calib, eval_batches=calib)
    return {name: get_format(name).export(request, out / get_format(name).file_name("cnn"))
            for name in ("executorch-fp32", "executorch-int8")}  # fmt: skip


def test_fp32_program_matches_pytorch_at_other_batch_sizes(cnn, programs) -> None:
    made = programs["executorch-fp32"]
    assert made.path.name == "cnn.fp32.pte" and made.path.read_bytes()[4:8] == b"ET12"
    assert made.dynamic_batch and made.parity.passed and made.delegated_ops >= 1
    runner = open_model_runner(made.path)
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        (out,) = runner.run([x.numpy()])
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, cnn(x).detach().numpy(), atol=1e-4)


def test_int8_program_agrees_with_pytorch_and_is_smaller(programs) -> None:
    fp32, int8 = programs["executorch-fp32"], programs["executorch-int8"]
    assert int8.parity.passed and int8.parity.top1_agreement is not None
    assert int8.parity.top1_agreement >= 0.85 and int8.calibration_batches == 6
    assert int8.bytes < fp32.bytes


def test_parity_fails_against_another_model(cnn, programs) -> None:
    other = type(cnn)().eval()
    report = executorch_parity(other, programs["executorch-fp32"].path, (torch.randn(1, 3, 16, 16),))
    assert not report.passed and report.max_abs_diff > report.tolerance


def test_a_corrupt_program_is_a_model_file_error(tmp_path, programs) -> None:
    bad = tmp_path / "bad.pte"
    bad.write_bytes(programs["executorch-fp32"].path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match=r"bad\.pte"):
        open_model_runner(bad)


def test_unknown_variant_is_refused(cnn) -> None:
    with pytest.raises(ExportError, match="variant"):
        export_executorch(cnn, torch.randn(1, 3, 16, 16), "x.pte", variant="fp16")


def test_registry_names_every_format_and_runtime_once() -> None:
    assert {r.family for r in FORMATS.values()} == {"onnx", "tflite", "executorch"}
    for record in FORMATS.values():
        assert set(record.runtimes) <= set(RUNTIMES), record.name
        assert all(record.suffix in RUNTIMES[r].suffixes for r in record.runtimes), record.name
    assert family_of("a/b.PTE") == "executorch" and runtimes_for_suffix(".pte") == ["executorch"]
    with pytest.raises(ExportError, match="known: onnx"):
        get_format("coreml")
