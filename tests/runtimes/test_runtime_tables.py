"""The device runner's own table of runtimes (it must stay self-contained) agrees with the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimship.exporters.registry import FORMATS
from slimship.runtimes import device_runner
from slimship.runtimes.registry import RUNTIMES


def test_device_runner_runs_exactly_the_registered_runtimes_with_their_suffixes() -> None:
    runner_table = {name: suffixes for name, (suffixes, _) in device_runner.RUNNERS.items()}
    registry_table = {name: record.suffixes for name, record in RUNTIMES.items()}
    assert runner_table == registry_table


def test_every_format_runs_on_registered_runtimes_that_open_its_suffix() -> None:
    for record in FORMATS.values():
        assert record.runtimes, record.name
        for runtime in record.runtimes:
            assert record.suffix in RUNTIMES[runtime].suffixes, (record.name, runtime)


@pytest.mark.parametrize(
    ("file_name", "runtime", "message"),
    [
        ("m.onnx", "litert", "runtime 'litert' cannot run ONNX files"),
        ("m.tflite", "executorch", "runtime 'executorch' cannot run TFLite files"),
        ("m.pte", "onnxruntime", "runtime 'onnxruntime' cannot run ExecuTorch programs"),
        ("m.bin", "auto", r"unknown model format \(expected .onnx, .tflite, .pte\)"),
    ],
)
def test_open_runner_refuses_a_runtime_that_cannot_open_the_file(
    tmp_path: Path, file_name: str, runtime: str, message: str
) -> None:
    path = tmp_path / file_name
    path.write_bytes(b"not a model")
    with pytest.raises(device_runner.RunnerLoadError, match=message):
        device_runner.open_runner(str(path), runtime)
