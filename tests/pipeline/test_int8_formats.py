"""The three int8 formats (onnx-int8, tflite-int8, executorch-int8) of a zoo model, from files on disk,
through `slimship run` and through `export` + `bench` + `release` + `verify`: every quantised file passes
every check it meets (its export verdict, the release's quality gates and bundle check, verify)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slimship import zero_random_groups
from slimship._util import sha256_file
from slimship.cli import main
from slimship.compare import REL_BOUNDS
from slimship.pipeline.verify import verify_bundle
from tests.zoo import ZOO

INT8 = ["onnx-int8", "tflite-int8", "executorch-int8"]
SHAPE = [3, 16, 16]


def half_zeroed_mobilenet() -> torch.nn.Module:
    """The zoo's MobileNetV2 with half of its channel groups zeroed (slimming removes them)."""
    model = ZOO["mobilenet_v2"]().model
    zero_random_groups(model, (torch.randn(2, *SHAPE),), fraction=0.5, seed=0)
    return model


def _int8_checks_hold(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = {f["role"] for f in manifest["files"]}
    assert set(INT8) <= roles
    checks = verify_bundle(bundle).parity
    for fmt in INT8:
        assert checks[fmt].ok and checks[fmt].precision == "int8"
        assert checks[fmt].rel_bound == REL_BOUNDS["int8"]
        # the manifest's figures are the ones verify measures on the same stored inputs (one verdict)
        assert checks[fmt].recorded_max_abs_diff == pytest.approx(
            checks[fmt].max_abs_diff, rel=1e-5, abs=1e-7
        )


@pytest.mark.slow  # three int8 exports of dense and slim, bench, release, verify
def test_int8_formats_through_run(tmp_path) -> None:
    pytest.importorskip("executorch.runtime")
    config = {
        "model": {"factory": f"{__name__}:half_zeroed_mobilenet", "input_shape": SHAPE},
        "export": {"formats": INT8},
        "targets": ["mobile-1t"],
        "bench": {"runs": 3, "warmup": 1},
        "release": {"name": "mbv2-int8", "version": "0.1.0", "out": str(tmp_path / "artifacts")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path), "--json", str(tmp_path / "run.json")]) == 0
    _int8_checks_hold(tmp_path / "artifacts" / "mbv2-int8-0.1.0")


@pytest.mark.slow  # three int8 exports, then a release that reuses them (`release --exports`)
def test_int8_formats_through_export_bench_release_and_verify(tmp_path, caplog) -> None:
    pytest.importorskip("executorch.runtime")
    samples = np.random.default_rng(0).standard_normal((16, *SHAPE)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", in0=samples)
    np.savez(tmp_path / "x.npz", in0=samples[:1])
    model = ["--model", f"{__name__}:half_zeroed_mobilenet", "--input-shape", *map(str, SHAPE)]
    calib = ["--calibration", str(tmp_path / "calib.npz")]
    out = tmp_path / "exported"
    code = main(
        ["export", *model, "--format", *INT8, *calib, "--out", str(out), "--json", str(tmp_path / "e.json")]
    )
    assert code == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["failures"] == [] and [r["format"] for r in report["formats"]] == INT8
    files = {r["format"]: Path(r["path"]) for r in report["formats"]}
    assert files["onnx-int8"].name.endswith(".int8.onnx") and all(p.is_file() for p in files.values())
    # bench feeds the full-int8 .tflite float inputs, quantised with its input's scale and zero point
    assert main(["bench", str(files["tflite-int8"]), "--inputs", str(tmp_path / "x.npz"), "--runs", "3"]) == 0
    assert main(["bench", str(files["tflite-int8"]), "--runs", "3"]) == 0  # random floats in its range
    releases = tmp_path / "releases"
    with caplog.at_level(logging.INFO, logger="slimship"):
        code = main(["release", *model, "--name", "mbv2", "--version", "0.1.0", "--format", *INT8, *calib,
                     "--exports", str(out), "--out", str(releases)])  # fmt: skip
    assert code == 0
    assert all(f"{fmt}: reused {files[fmt]}" in caplog.text for fmt in INT8), caplog.text
    _int8_checks_hold(releases / "mbv2-0.1.0")
    # the release bundled the very files the export wrote and checked (reused from its index, not redone)
    manifest = json.loads((releases / "mbv2-0.1.0" / "manifest.json").read_text())
    bundled = {f["role"]: f["sha256"] for f in manifest["files"] if f["role"] in INT8}
    assert bundled == {fmt: sha256_file(path) for fmt, path in files.items()}
    assert main(["verify", str(releases / "mbv2-0.1.0.tar.gz")]) == 0
