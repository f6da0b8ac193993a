"""A multi-format export keeps every format that passed and names each failure with its reason."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from slimship.cli import main
from slimship.errors import ExportError
from slimship.exporters.registry import FORMATS, ExportFailures, ExportRequest, export_formats
from slimship.pipeline.export_index import INDEX_NAME
from tests.exporters.conftest import TwoInTwoOut


def test_a_failing_format_leaves_no_file_and_the_others_are_kept(tmp_path) -> None:
    model = TwoInTwoOut().eval()
    example = (torch.randn(2, 6), torch.randn(2, 3))
    wrong = [(torch.randn(2, 5), torch.randn(2, 3))]  # calibration of the wrong width: int8 cannot calibrate
    request = ExportRequest(model, example, example, calibration=wrong, eval_batches=None)
    with pytest.raises(ExportFailures) as caught:
        export_formats(["onnx", "onnx-int8", "onnx-fp16"], request, tmp_path, "two")
    assert set(caught.value.results) == {"onnx", "onnx-fp16"}
    assert set(caught.value.failures) == {"onnx-int8"}
    assert "quantization failed" in caught.value.failures["onnx-int8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.fp16.onnx", "two.onnx"]
    assert "1 of 3 formats failed; kept onnx, onnx-fp16" in str(caught.value)


def test_every_format_has_its_own_file_name() -> None:
    names = [record.file_name("model") for record in FORMATS.values()]
    assert len(set(names)) == len(names)
    assert FORMATS["onnx"].file_name("m") == "m.onnx" and FORMATS["onnx-int8"].file_name("m") == "m.int8.onnx"


def test_cli_export_writes_what_passed_and_reports_the_failure(tmp_path, monkeypatch, capsys) -> None:
    def broken(request, path):
        raise ExportError("the converter refused op aten.foo")

    monkeypatch.setitem(FORMATS, "tflite-fp16", dataclasses.replace(FORMATS["tflite-fp16"], exporter=broken))
    model = ["--model", "tests.exporters.conftest:ConvBNNet", "--input-shape", "3", "16", "16"]
    out, report = tmp_path / "out", tmp_path / "export.json"
    formats = ["--format", "onnx", "tflite-fp16"]
    assert main(["export", *model, *formats, "--out", str(out), "--json", str(report)]) == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "ConvBNNet.onnx",
        INDEX_NAME,
    ]  # the passing file (indexed)
    assert [e["format"] for e in json.loads((out / INDEX_NAME).read_text())["entries"]] == ["onnx"]
    payload = json.loads(report.read_text())
    assert [r["format"] for r in payload["formats"]] == ["onnx"]
    assert payload["failures"] == [{"format": "tflite-fp16", "reason": "the converter refused op aten.foo"}]
    assert "tflite-fp16 failed: the converter refused op aten.foo" in capsys.readouterr().err
