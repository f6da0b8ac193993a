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


def _no_cache_allowed(monkeypatch) -> None:
    """Building the static cache or the reference generation fails the test: the refusal comes first."""

    def allocates(*args, **kwargs):
        raise AssertionError("allocated before the memory check")

    monkeypatch.setattr("slimship.decoder.export.StaticKVDecoder", allocates)
    monkeypatch.setattr("slimship.decoder.export.reference_generation", allocates)


def test_a_static_cache_over_the_memory_budget_is_refused_before_it_is_allocated(
    tmp_path: Path, capsys, monkeypatch
):
    import json

    from tests.decoder.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "tiny")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 10**9  # a claim: the cache it allows is 95 GB here
    (folder / "config.json").write_text(json.dumps(config))
    _no_cache_allowed(monkeypatch)
    out = tmp_path / "out"
    argv = [
        "export",
        str(folder),
        "--task",
        "text-generation",
        "--format",
        "executorch-fp32",
        "--out",
        str(out),
    ]
    _fails([*argv, "--max-seq-len", "100000000"], capsys, "--max-seq-len 100000000", "static KV cache",
           "GiB", "memory budget")  # fmt: skip
    # a small budget refuses a modest cache too, and names the budget given
    _fails(["--max-memory", "1MiB", *argv, "--max-seq-len", "4096"], capsys, "--max-seq-len 4096",
           "over the --max-memory budget of 1.0 MiB")  # fmt: skip
    _fails(["--max-memory", "1MiB", *argv[:-4], "--format", "onnx", "executorch-8da4w", *argv[-2:],
            "--max-seq-len", "4096"], capsys, "static KV cache")  # fmt: skip
    assert not out.exists()


def test_max_seq_len_beyond_the_model_positions_is_refused_naming_both(tmp_path: Path, capsys, monkeypatch):
    from tests.decoder.tiny import write_checkpoint

    folder = write_checkpoint(tmp_path / "tiny")  # max_position_embeddings 256
    _no_cache_allowed(monkeypatch)
    argv = [
        "export",
        str(folder),
        "--task",
        "text-generation",
        "--format",
        "onnx",
        "--out",
        str(tmp_path / "o"),
    ]
    _fails([*argv, "--max-seq-len", "257"], capsys, "--max-seq-len 257", "max_position_embeddings 256")


def test_static_cache_bytes_are_counted_per_layer():
    from slimship.budget import MemoryBudgetError, set_max_memory
    from slimship.decoder.cache import STATIC_CACHE_COPIES, KVLayout, check_static_cache
    from slimship.decoder.export import DECODER_FORMATS

    layout = KVLayout(heads=(1, 2), key_dims=(16, 16), value_dims=(16, 8))
    per_slot = 1 * (16 + 16) + 2 * (16 + 8)  # a slim layer keeps its own heads and widths
    assert check_static_cache(layout, 100, None, 0) == per_slot * 100 * 4
    assert check_static_cache(layout, 100, None, 0, itemsize=2) == per_slot * 100 * 2
    try:
        set_max_memory(per_slot * 100 * 4 * STATIC_CACHE_COPIES)
        check_static_cache(layout, 100, 100, 0)  # exactly at the budget
        with pytest.raises(MemoryBudgetError, match="--max-seq-len 101"):
            check_static_cache(layout, 101, None, 0)
    finally:
        set_max_memory(None)
    assert {n for n, f in DECODER_FORMATS.items() if f.static_cache} == {
        "executorch-fp32",
        "executorch-8da4w",
    }
