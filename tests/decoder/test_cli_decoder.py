"""`export --task text-generation`, `bench --task text-generation` and `generate` on bad inputs: exit 2,
`slimship: error:` naming the file or option, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimship.cli import main
from slimship.decoder import export_decoder
from slimship.errors import ExportError

SLIM = "tests.decoder.tiny:tiny_slim_llama"


def _fails(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "slimship: error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_generate_refuses_files_it_cannot_decode(tmp_path: Path, capsys):
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program")
    _fails(["generate", str(junk), "--prompt-ids", "1,2"], capsys, str(junk), "cannot load")
    text = tmp_path / "model.tflite"
    text.write_bytes(b"x")
    _fails(["generate", str(text), "--prompt-ids", "1,2"], capsys, str(text), ".pte and .onnx")
    _fails(["generate", str(tmp_path / "none.pte"), "--prompt-ids", "1"], capsys, "no such file")
    _fails(["generate", str(junk), "--prompt-ids", "1,a"], capsys, "--prompt-ids")


def test_export_refuses_bad_options_before_any_work(tmp_path: Path, capsys):
    out = tmp_path / "out"
    base = ["export", "--model", SLIM, "--task", "text-generation", "--out", str(out)]
    _fails([*base, "--format", "tflite-fp32"], capsys, "tflite-fp32", "no text-generation exporter")
    _fails([*base, "--format", "onnx", "--max-seq-len", "1"], capsys, "--max-seq-len 1")
    _fails(["export", str(tmp_path / "x.pt2"), "--task", "text-generation", "--format", "onnx"], capsys,
           "checkpoint folder or --model")  # fmt: skip
    _fails([*base[:2], "tests.decoder.tiny:VOCAB", *base[3:], "--format", "onnx"], capsys, "no callable")
    _fails(
        [*base[:2], "torch.nn:Identity", *base[3:], "--format", "onnx"],
        capsys,
        "not a transformers causal LM",
    )
    assert not out.exists()


def test_8da4w_is_a_text_generation_format(tmp_path: Path, capsys):
    _fails(["export", "--model", "torch.nn:Identity", "--input-shape", "4", "--format", "executorch-8da4w",
            "--out", str(tmp_path / "o")], capsys, "--task text-generation")  # fmt: skip


def test_bench_refuses_files_that_are_no_decoders(tmp_path: Path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    argv = ["bench", str(onnx), "--task", "text-generation", "--runs", "1"]
    _fails(argv, capsys, str(onnx))


def test_unknown_format_is_refused_before_any_work(tmp_path: Path):
    with pytest.raises(ExportError, match="no text-generation exporter; known: executorch-fp32"):
        export_decoder(object(), ["tflite-fp32"], tmp_path, "x")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
