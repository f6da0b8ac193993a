"""`slimship release --exports DIR` reuses the files `slimship export --out DIR` checked (export index)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimship.cli import main
from slimship.exporters import registry
from slimship.pipeline.export_index import INDEX_NAME, MAX_INDEX_BYTES

FORMATS = ["onnx", "onnx-int8", "tflite-int8"]


def _program(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
    ).eval()
    x = torch.randn(1, 3, 12, 12)  # a static batch of 1, as a device runs it
    torch.export.save(torch.export.export(model, (x,), strict=False), path)
    return path


def _calibration(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, in0=rng.standard_normal((16, 3, 12, 12)).astype(np.float32))
    return path


@pytest.fixture
def exports(monkeypatch) -> list[str]:
    """Every format an exporter really exports (in order)."""
    calls: list[str] = []
    export = registry.FormatRecord.export

    def counted(self, request, path):
        calls.append(self.name)
        return export(self, request, path)

    monkeypatch.setattr(registry.FormatRecord, "export", counted)
    return calls


@pytest.fixture(scope="module")
def exported_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .pt2 exported to FORMATS with a calibration file, in one folder: model.pt2, calib.npz, ex/."""
    root = tmp_path_factory.mktemp("reuse")
    model, calib = _program(root / "model.pt2"), _calibration(root / "calib.npz", 0)
    args = [
        "export",
        str(model),
        "--format",
        *FORMATS,
        "--calibration",
        str(calib),
        "--out",
        str(root / "ex"),
    ]
    assert main(args) == 0
    return root


@pytest.fixture
def exported(exported_once: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of `exported_once` for one test: (model, calibration, export folder)."""
    shutil.copytree(exported_once, tmp_path / "in")
    return tmp_path / "in" / "model.pt2", tmp_path / "in" / "calib.npz", tmp_path / "in" / "ex"


def _release(model: Path, calib: Path, out: Path, exports: Path | None = None) -> str:
    args = [
        "release",
        str(model),
        "--name",
        "m",
        "--version",
        "1.0.0",
        "--out",
        str(out),
        "--format",
        *FORMATS,
    ]
    args += ["--calibration", str(calib)] + (["--exports", str(exports)] if exports else [])
    assert main(args) == 0
    return hashlib.sha256((out / "m-1.0.0.tar.gz").read_bytes()).hexdigest()


def test_release_reuses_checked_exports_and_its_bundle_is_the_same(exported, exports, tmp_path) -> None:
    model, calib, folder = exported
    index = json.loads((folder / INDEX_NAME).read_text())
    assert sorted(e["format"] for e in index["entries"]) == sorted(FORMATS)
    exports.clear()
    fresh = _release(model, calib, tmp_path / "b")  # first: the exporters see the example before the .pt2
    assert exports == FORMATS
    exports.clear()
    reused = _release(model, calib, tmp_path / "a", folder)
    assert exports == []  # no exporter ran: every file came from the export folder
    assert reused == fresh  # the same bundle, byte for byte


def test_a_tampered_or_truncated_file_is_exported_again(exported, exports, tmp_path, caplog) -> None:
    model, calib, folder = exported
    target = folder / "model.int8.onnx"
    target.write_bytes(target.read_bytes()[:-7])  # truncated
    exports.clear()
    with caplog.at_level(logging.INFO, logger="slimship"):
        reused = _release(model, calib, tmp_path / "a", folder)
    assert exports == ["onnx-int8"]
    assert any(
        "changed since it was checked" in r.message and "model.int8.onnx" in r.message for r in caplog.records
    )
    assert reused == _release(model, calib, tmp_path / "b")


def test_a_changed_model_or_calibration_is_not_reused(exported, exports, tmp_path, caplog) -> None:
    model, calib, folder = exported
    exports.clear()
    other_calib = _calibration(tmp_path / "other.npz", 1)
    with caplog.at_level(logging.INFO, logger="slimship"):
        _release(model, other_calib, tmp_path / "a", folder)
    assert exports == ["onnx-int8", "tflite-int8"]  # the int8 files depend on the calibration, not onnx
    assert any("judged again on this data" in r.message for r in caplog.records)  # its verdict: on this data
    exports.clear()
    _release(_program(tmp_path / "other.pt2", seed=1), calib, tmp_path / "b", folder)
    assert exports == FORMATS


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda text: text.replace('"sha256": "', '"sha256": "zz', 1), "entries.0.sha256"),
        (lambda text: text.replace('"file": "model.onnx"', '"file": "../model.pt2"', 1), "entries.0.file"),
        (lambda text: text.replace('"reason": ""', '"reason": "", "pickle": 1', 1), "pickle"),
        (lambda text: text.replace('"passed": true', '"passed": false', 1), "passed"),
        (lambda text: text[: len(text) // 2], "not an export index"),
        (lambda text: text + " " * MAX_INDEX_BYTES, f"larger than {MAX_INDEX_BYTES} bytes"),
    ],
)
def test_a_bad_index_is_refused_by_name_before_any_work(
    exported, exports, tmp_path, capsys, damage, said
) -> None:
    model, _, folder = exported
    index = folder / INDEX_NAME
    index.write_text(damage(index.read_text()))
    exports.clear()
    args = ["release", str(model), "--name", "m", "--version", "1.0.0", "--out", str(tmp_path / "a")]
    assert main([*args, "--exports", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimship: error:") and str(index) in err and said in err
    assert exports == [] and not (tmp_path / "a").exists()


def test_release_from_a_folder_without_an_index_is_refused(tmp_path, capsys) -> None:
    model = _program(tmp_path / "model.pt2")
    args = ["release", str(model), "--name", "m", "--version", "1.0.0", "--out", str(tmp_path / "a")]
    assert main([*args, "--exports", str(tmp_path)]) == 2
    assert "no export index" in capsys.readouterr().err


@pytest.mark.slow  # two `slimship run`s of the tiny torchrun config in this process: 40-100 s
def test_run_reuses_its_cache_folder(tmp_path, exports, monkeypatch) -> None:
    """A second `run --exports DIR` of the same seeded config exports nothing: its dense and slim files
    come from DIR, each file is the same, and so is its recorded verdict."""
    from tests.pipeline.test_torchrun import _config

    folder, cache = tmp_path / "p", tmp_path / "cache"
    monkeypatch.syspath_prepend(str(folder))
    first = _config(folder, "reuse_run", "out1")
    second = _config(folder, "reuse_run", "out2")
    assert main(["run", str(first), "--exports", str(cache)]) == 0
    assert exports == ["onnx", "onnx"]  # dense and slim
    assert len(json.loads((cache / INDEX_NAME).read_text())["entries"]) == 2
    exports.clear()
    assert main(["run", str(second), "--exports", str(cache)]) == 0
    assert exports == []
    one, two = (folder / out / "tiny-0.1.0" for out in ("out1", "out2"))
    assert (one / "model.onnx").read_bytes() == (two / "model.onnx").read_bytes()
    manifests = [json.loads((b / "manifest.json").read_text()) for b in (one, two)]
    assert manifests[0]["parity"] == manifests[1]["parity"]


@pytest.mark.parametrize("cache", [True, False])
def test_past_its_bound_an_index_drops_its_oldest_entries(tmp_path, monkeypatch, cache) -> None:
    """A cache evicts its oldest files with their entries; an export folder's files stay where they are."""
    from slimship.pipeline import export_index

    monkeypatch.setattr(export_index, "MAX_ENTRIES", 2)
    index = export_index.ExportIndex(tmp_path, cache=cache)
    verdict = export_index.Verdict(
        max_abs_diff=0.0, max_rel_diff=0.0, tolerance=1e-4, rel_bound=1e-4, passed=True, cases=["example"],
        per_case={"example": {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "tolerance": 1e-4}},
    )  # fmt: skip
    for i in range(3):
        (tmp_path / f"f{i}.onnx").write_bytes(b"x" * (i + 1))
        key, digest = hashlib.sha256(b"%d" % i).hexdigest(), hashlib.sha256(b"x" * (i + 1)).hexdigest()
        entry = export_index.IndexEntry(key=key, format="onnx", file=f"f{i}.onnx", sha256=digest,
                                        bytes=i + 1, data_sha256=key, parity=verdict)  # fmt: skip
        index.add(entry)
    index.save()
    kept = export_index.ExportIndex.load(tmp_path).entries.values()
    assert [e.file for e in kept] == ["f1.onnx", "f2.onnx"]
    assert (tmp_path / "f0.onnx").exists() is not cache


def test_a_file_that_fails_its_check_on_the_releases_data_is_not_reused(tmp_path, caplog) -> None:
    """Other data: the copy is judged again, and a failing (or unrunnable) verdict means exporting again."""
    from slimship.errors import ModelFileError
    from slimship.exporters.common import ParityReport
    from slimship.pipeline import export_index

    verdict = export_index.Verdict(
        max_abs_diff=0.0, max_rel_diff=0.0, tolerance=1e-4, rel_bound=1e-4, passed=True, cases=["example"],
        per_case={"example": {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "tolerance": 1e-4}},
    )  # fmt: skip
    (tmp_path / "m.onnx").write_bytes(b"model")
    key = hashlib.sha256(b"k").hexdigest()
    digest = hashlib.sha256(b"model").hexdigest()
    entry = export_index.IndexEntry(key=key, format="onnx", file="m.onnx", sha256=digest, bytes=5,
                                    data_sha256=key, parity=verdict)  # fmt: skip
    index = export_index.ExportIndex(tmp_path, {key: entry})
    failing = ParityReport(0.5, 0.5, 1e-4, 1e-4, False, ["example"])

    def unrunnable(path, dynamic):
        raise ModelFileError(f"{path}: cannot be loaded")

    out = tmp_path / "out"
    out.mkdir()
    other = hashlib.sha256(b"other data").hexdigest()
    onnx = registry.FORMATS["onnx"]
    for judge, said in ((lambda p, d: failing, "fails its check"), (unrunnable, "cannot be loaded")):
        with caplog.at_level(logging.INFO, logger="slimship"):
            assert export_index.reuse(index, key, onnx, out / "m.onnx", other, judge) is None
        assert said in caplog.text and not (out / "m.onnx").exists()
    reused = export_index.reuse(index, key, onnx, out / "m.onnx", key, unrunnable)
    assert reused is not None and not reused.rejudged  # the same data: the recorded verdict stands
