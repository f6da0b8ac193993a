"""Session fixtures: the tiny Llama as checkpoint folders and the files `slimship export --task
text-generation` writes from them, made once per test session (once per pytest-xdist worker).

A user's path, all through the CLI on files on disk: `write_checkpoint` (zeroed groups, tokenizer,
generation config) -> `slimship slim DIR` -> `slimship export SLIM_DIR --task text-generation`. The tests
only read these files; whatever they write goes to their own `tmp_path`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimship.cli import main
from tests.decoder.tiny import write_checkpoint

MAX_SEQ_LEN = 48  # the cache every exported file holds: prompt + new tokens of every test below
EXPORT = ["export", "--task", "text-generation", "--max-seq-len", str(MAX_SEQ_LEN)]


def _export(model: Path, out: Path, formats: list[str]) -> dict:
    """`slimship export MODEL --task text-generation --format ...`; its `--json` report."""
    report = out.parent / f"{out.name}.json"
    code = main([*EXPORT, str(model), "--format", *formats, "--out", str(out), "--json", str(report)])
    assert code == 0, f"export {model} {formats} failed"
    return json.loads(report.read_text())


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`dense`: the zeroed tiny Llama's checkpoint folder; `slim`: `slimship slim` of it."""
    root = tmp_path_factory.mktemp("tiny-llama")
    dense, slim = write_checkpoint(root / "dense"), root / "slim"
    assert main(["slim", str(dense), "--out", str(slim)]) == 0
    return {"dense": dense, "slim": slim}


@pytest.fixture(scope="session")
def tiny_onnx(tiny_folders: dict[str, Path]) -> dict:
    """ONNX (fp32 and int4) of the slim and the dense folder: paths and the slim export's report."""
    slim, dense = tiny_folders["slim"].parent / "onnx-slim", tiny_folders["slim"].parent / "onnx-dense"
    report = _export(tiny_folders["slim"], slim, ["onnx", "onnx-int4"])
    _export(tiny_folders["dense"], dense, ["onnx", "onnx-int4"])
    return {
        "report": report, "dir": slim, "onnx": slim / "slim.onnx", "int4": slim / "slim.int4.onnx",
        "dense_onnx": dense / "dense.onnx", "dense_int4": dense / "dense.int4.onnx",
    }  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pte(tiny_folders: dict[str, Path]) -> dict:
    """ExecuTorch files (fp32 and 8da4w) of the slim folder, fp32 of the dense one: paths and the slim
    export's report."""
    pytest.importorskip("executorch.runtime")
    root = tiny_folders["slim"].parent
    report = _export(tiny_folders["slim"], root / "pte-slim", ["executorch-fp32", "executorch-8da4w"])
    _export(tiny_folders["dense"], root / "pte-dense", ["executorch-fp32"])
    return {
        "report": report, "dir": root / "pte-slim",
        "pte": root / "pte-slim" / "slim.fp32.pte", "pte4": root / "pte-slim" / "slim.8da4w.pte",
        "dense_pte": root / "pte-dense" / "dense.fp32.pte",
    }  # fmt: skip
