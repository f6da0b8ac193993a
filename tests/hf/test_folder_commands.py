"""`export`, `bench` and `release` take a checkpoint folder (through slimship.sources)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import slimship
from slimship.cli import main
from slimship.hf import LogitsOnly
from slimship.sources import input_specs
from tests.hf.folders import tiny_model, write_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dense = write_folder(tiny_model("qwen2", seed=3), root / "dense")
    assert main(["slim", str(dense), "--out", str(root / "slim")]) == 0
    return dense, root / "slim"


def test_export_a_slim_folder_to_onnx(folders, tmp_path, capsys) -> None:
    _, slim = folders
    capsys.readouterr()
    assert main(["export", str(slim), "--format", "onnx", "--out", str(tmp_path), "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    onnx_file = tmp_path / "slim.onnx"
    assert report["formats"][0]["path"] == str(onnx_file)
    ids = torch.tensor([[5, 1, 60, 7, 7, 2, 33, 4]])
    expected = LogitsOnly(slimship.load_pretrained(slim))(ids).detach().numpy()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert input_specs(slim)[0].dtype == "int64"


@pytest.mark.slow
def test_bench_and_release_take_folders(folders, tmp_path, capsys) -> None:
    dense, slim = folders
    capsys.readouterr()
    argv = ["bench", str(slim), "--dense", str(dense), "--runs", "3", "--warmup", "1", "--json", "-"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["speedups"]) == 1 and result["speedups"][0]["format"] == "onnx"
    argv = ["release", str(slim), "--name", "tiny", "--version", "1.0.0", "--format", "onnx"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert main(["verify", str(tmp_path / "tiny-1.0.0")]) == 0
