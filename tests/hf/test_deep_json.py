"""JSON a user gives nested far too deeply (a RecursionError in json.loads otherwise): config.json of a
checkpoint folder, an export index, tokenizer files: `slimship: error:` naming the file, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimship.cli import main
from slimship.decoder.bundle import load_tokenizer, tokenizer_files
from slimship.errors import ModelFileError
from slimship.pipeline.export_index import INDEX_NAME, ExportIndex, ExportIndexError

DEEP_OBJECT = '{"a":' * 100_000 + "1" + "}" * 100_000
DEEP_LIST = "[" * 100_000 + "]" * 100_000


def _fails(argv: list[str], capsys, *named: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("slimship: error:") and "Traceback" not in err, err
    for text in named:
        assert text in err, err


@pytest.fixture
def deep_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "config.json").write_text(DEEP_OBJECT)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_slim_refuses_a_deep_config(deep_folder: Path, tmp_path: Path, capsys) -> None:
    _fails(["slim", str(deep_folder), "--out", str(tmp_path / "slim")], capsys, "config.json", "128 levels")
    assert not (tmp_path / "slim").exists()


def test_export_refuses_a_deep_config(deep_folder: Path, tmp_path: Path, capsys) -> None:
    argv = ["export", str(deep_folder), "--task", "text-generation", "--format", "onnx"]
    _fails([*argv, "--out", str(tmp_path / "out")], capsys, "config.json")


def test_a_deep_export_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / INDEX_NAME).write_text(DEEP_LIST)
    with pytest.raises(ExportIndexError, match=rf"{INDEX_NAME}: not an export index .*128 levels"):
        ExportIndex.load(tmp_path)
    (tmp_path / INDEX_NAME).write_text("[" * 200 + "]" * 200)  # parses, but over the bound
    with pytest.raises(ExportIndexError, match="nests 200 levels deep"):
        ExportIndex.load(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_deep_tokenizer_files_are_refused_before_transformers(tmp_path: Path, name: str) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (tmp_path / name).write_text(DEEP_OBJECT)
    for read in (load_tokenizer, tokenizer_files):
        with pytest.raises(ModelFileError, match=name):
            read(tmp_path)
