"""bench --dense MODEL.pt2 --calibration: the dense int8 twin is calibrated like the slim one, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from slimship.cli import main


def _files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    dense = tmp_path / "dense.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 8, 8),), strict=False), dense)
    calib = tmp_path / "calib.npz"
    np.savez(calib, in0=np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    return dense, calib


def test_the_dense_twin_is_calibrated_on_the_given_samples_and_dynamic_formats_need_none(tmp_path, capsys):
    dense, calib = _files(tmp_path)
    out = tmp_path / "x"
    fmts = ["onnx-int8", "onnx-int8-dynamic"]
    assert (
        main(["export", str(dense), "--format", *fmts, "--calibration", str(calib), "--out", str(out)]) == 0
    )
    files = [str(out / "dense.int8.onnx"), str(out / "dense.int8-dynamic.onnx")]
    capsys.readouterr()
    bench = ["bench", *files, "--dense", str(dense), "--runs", "3", "--warmup", "1", "--json", "-"]
    assert main([*bench, "--calibration", str(calib)]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert f"{dense} as onnx-int8: calibrated on the 8 --calibration samples" in notes
    assert not any("int8-dynamic" in n and "calibrated" in n for n in notes)
    assert main(bench) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(
        n.startswith(f"{dense} as onnx-int8: calibrated on the bench inputs only (give") for n in notes
    )


def test_calibration_without_a_dense_pt2_is_refused_by_name(tmp_path, capsys):
    dense, calib = _files(tmp_path)
    assert main(["export", str(dense), "--format", "onnx", "--out", str(tmp_path / "x")]) == 0
    onnx = tmp_path / "x" / "dense.onnx"
    assert main(["bench", str(onnx), "--dense", str(onnx), "--calibration", str(calib), "--runs", "2"]) == 2
    assert f"--calibration {calib}" in capsys.readouterr().err
