"""The parts of a text-generation release that need no exported file: its gates, the manifest schema's
text-generation section, file names, tokenizer files and the replay's first difference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimship.decoder.bundle import load_tokenizer, tokenizer_files
from slimship.decoder.release import dense_for, model_files
from slimship.decoder.replay import first_difference
from slimship.errors import ConfigError, ModelFileError, ReleaseError
from slimship.pipeline import manifest as mf
from slimship.pipeline.gates import (
    FAILED,
    NOT_EVALUATED,
    OFF,
    PASSED,
    TEXT_GENERATION,
    GateFigures,
    GatesSpec,
    evaluate_gates,
)
from tests.decoder.tiny import tiny_tokenizer

FIGURES = GateFigures(
    decode_speedup={"host/onnx": 1.4},
    ms_per_token={"host/onnx": 2.0, "host/executorch-8da4w": 0.5},
    token_agreement={"host/executorch-8da4w": 0.6},
)


def _status(results, gate, subject=""):
    return next(r.status for r in results if r.gate == gate and r.subject == subject)


def test_text_generation_gates_compare_decode_figures() -> None:
    spec = GatesSpec(min_decode_speedup=1.5, max_ms_per_token=1.0, min_token_agreement=0.5)
    results = evaluate_gates(spec, FIGURES, TEXT_GENERATION)
    assert _status(results, "min_decode_speedup", "host/onnx") == FAILED
    assert _status(results, "max_ms_per_token", "host/onnx") == FAILED
    assert _status(results, "max_ms_per_token", "host/executorch-8da4w") == PASSED
    assert _status(results, "min_token_agreement", "host/executorch-8da4w") == PASSED
    # the one-pass gates are left out of a decoder release unless set explicitly
    assert {r.gate for r in results} == {"min_decode_speedup", "max_ms_per_token", "min_token_agreement"}
    results = evaluate_gates(GatesSpec(min_agreement=0.9), FIGURES, TEXT_GENERATION)
    assert _status(results, "min_agreement") == NOT_EVALUATED
    assert _status(results, "min_decode_speedup") == OFF
    # and a one-pass release lists none of the decoder gates unless set
    assert not {r.gate for r in evaluate_gates(GatesSpec(), GateFigures())} & {"max_ms_per_token"}
    (set_here,) = [
        r for r in evaluate_gates(GatesSpec(max_ms_per_token=3.0), FIGURES) if r.gate == "max_ms_per_token"
    ]
    assert set_here.status == NOT_EVALUATED and "text-generation" in set_here.detail


def test_a_per_target_ms_per_token_limit() -> None:
    results = evaluate_gates(GatesSpec(max_ms_per_token={"host": 1.0}), FIGURES, TEXT_GENERATION)
    assert _status(results, "max_ms_per_token", "host/onnx") == FAILED


def _manifest() -> dict:
    entry = {
        "path": "model.onnx",
        "format": "onnx",
        "precision": "fp32",
        "quantised": False,
        "tokens": [4, 5],
    }
    return {
        "schema_version": "1.1", "name": "t", "version": "1.0.0", "created_by": "slimship", "files": [],
        "model": {"inputs": [{"name": "tokens", "shape": [1, "seq"], "dtype": "int64"}],
                  "outputs": [{"name": "logits", "shape": [1, "seq", 8], "dtype": "float32"}],
                  "source_sha256": "0" * 64},
        "slimming": {}, "parity": {}, "accuracy": {}, "latency": {"device": {}, "emulated": {}},
        "versions": {k: None for k in ("python", "slimship", "torch", "onnx", "onnxruntime", "litert-torch",
                                       "ai-edge-litert", "tflite-runtime")},
        "config": {}, "task": "text-generation",
        "text_generation": {
            "reference": {"prompt": [1, 2], "tokens": [4, 5], "next_tokens": [3, 4, 5], "made_by": "gen"},
            "measurement": {}, "files": {"onnx": entry}, "tokenizer_files": [],
        },
    }  # fmt: skip


def test_schema_takes_a_text_generation_manifest_and_keeps_the_one_pass_rules() -> None:
    manifest = _manifest()
    mf.validate_manifest(manifest)
    missing = {k: v for k, v in manifest.items() if k != "text_generation"}
    with pytest.raises(ReleaseError, match="text_generation"):
        mf.validate_manifest(missing)
    one_pass = {k: v for k, v in manifest.items() if k != "task"}  # no task: reference_io required
    with pytest.raises(ReleaseError, match="reference_io"):
        mf.validate_manifest(one_pass)
    manifest["text_generation"]["files"]["onnx"]["path"] = "../model.onnx"
    with pytest.raises(ReleaseError, match="text_generation"):
        mf.validate_manifest(manifest)


def test_file_names_say_the_format(tmp_path: Path) -> None:
    names = ["slim.fp32.pte", "slim.8da4w.pte", "slim.onnx", "slim.int4.onnx", "dense.fp32.pte"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    files = model_files([tmp_path / n for n in names[:4]])
    assert list(files) == ["executorch-fp32", "executorch-8da4w", "onnx", "onnx-int4"]
    assert dense_for(files, [tmp_path / "dense.fp32.pte"]) == {
        "executorch-fp32": tmp_path / "dense.fp32.pte", "executorch-8da4w": None, "onnx": None,
        "onnx-int4": None,
    }  # fmt: skip
    with pytest.raises(ConfigError, match="both executorch-fp32"):
        model_files([tmp_path / "slim.fp32.pte", tmp_path / "dense.fp32.pte"])
    (tmp_path / "slim.int8.pte").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"slim\.int8\.pte"):
        model_files([tmp_path / "slim.int8.pte"])
    with pytest.raises(ModelFileError, match="no such file"):
        model_files([tmp_path / "gone.onnx"])


def test_tokenizer_files_are_read_locally_and_custom_code_is_refused(tmp_path: Path) -> None:
    tiny_tokenizer().save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "README.md").write_text("not copied")
    assert set(tokenizer_files(tmp_path)) == {
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert load_tokenizer(tmp_path).encode("the slim model") == tiny_tokenizer().encode("the slim model")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["custom.Tok", None]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="auto_map"):
        tokenizer_files(tmp_path)
    with pytest.raises(ConfigError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "..")


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 9, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_release_refuses_bad_options_before_any_work(tmp_path: Path, capsys) -> None:
    from slimship.cli import main

    out = tmp_path / "releases"
    base = ["release", str(tmp_path), "--task", "text-generation", "--name", "t", "--out", str(out)]
    cases = [
        (["--version", "1.0", "--files", "a.onnx"], "release version '1.0' is invalid"),
        (["--version", "1.0.0", "--format", "onnx"], "--format: a text-generation release takes the files"),
        (["--version", "1.0.0"], "give the decoder files with --files"),
        (["--version", "1.0.0", "--files", "a.onnx", "--min-token-agreement", "2"], "--min-token-agreement"),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "slimship: error:" in err and needle in err, err
    assert not out.exists()
