"""Every command that writes checks its output location up front: a folder that cannot be written, a path
below a regular file, or /proc gives exit 2 and `slimship: error:` naming the path before any work; an
OSError in the final write names the path too, and nothing partial is left behind."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from slimship.cli import main
from slimship.errors import SlimshipError
from slimship.outputs import move_all

Capture = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).eval()
    path = root / "tiny.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(1, 1, 8, 8),), strict=False), str(path))
    return path


@pytest.fixture()
def read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder nothing can be created in (as root chmod does not stop writes: the probe is refused)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkdtemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    return folder


def _commands(pt2: Path, out: Path, src_dir: Path) -> dict[str, list[str]]:
    """command -> argv writing to `out` (a file or folder path)."""
    return {
        "slim": ["slim", str(pt2), "--out", str(out / "x.pt2")],
        "slim-dir": ["slim", str(src_dir), "--out", str(out / "slimdir")],
        "export": ["export", str(pt2), "--format", "onnx", "--out", str(out / "exp")],
        "export-here": ["export", str(pt2), "--format", "onnx", "--out", str(out)],
        "bench-json": ["bench", str(pt2), "--runs", "1", "--json", str(out / "b.json")],
        "config-schema": ["config-schema", "--out", str(out / "schema.json")],
        "targets-json": ["targets", "--json", str(out / "t.json")],
        "generate-json": ["generate", str(pt2), "--prompt-ids", "1", "--json", str(out / "g.json")],
        "release": ["release", str(pt2), "--name", "r", "--version", "0.1.0", "--format", "onnx",
                    "--out", str(out)],
    }  # fmt: skip


COMMANDS = list(_commands(Path("m.pt2"), Path("o"), Path("d")))


def _assert_refused(capsys: pytest.CaptureFixture[str], argv: list[str], named: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "slimship: error:" in err and named in err, err
    assert "internal error" not in err and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_folder_is_refused_up_front(
    command: str, pt2: Path, read_only: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from slimship import sources

    monkeypatch.setattr(sources, "model_from_args", _no_work)  # any work would fail the test
    src = tmp_path / "ckpt"
    src.mkdir()
    _assert_refused(capsys, _commands(pt2, read_only, src)[command], str(read_only))
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_path_below_a_file_is_refused(
    command: str, pt2: Path, tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimship import sources

    monkeypatch.setattr(sources, "model_from_args", _no_work)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file")
    src = tmp_path / "ckpt"
    src.mkdir()
    _assert_refused(capsys, _commands(pt2, blocker / "out", src)[command], str(blocker))
    assert blocker.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file.txt"]


@pytest.mark.parametrize("command", ["slim", "export", "bench-json", "config-schema", "release"])
def test_proc_is_refused(
    command: str, pt2: Path, tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    from slimship import sources

    monkeypatch.setattr(sources, "model_from_args", _no_work)
    _assert_refused(capsys, _commands(pt2, Path("/proc/slimship_x"), tmp_path)[command], "/proc")


def _no_work(*args, **kwargs):
    raise AssertionError("the output location should have been refused before the model was loaded")


def test_final_write_error_names_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder passed the probe but the write fails (disk full): an error naming --out, nothing left."""
    from slimship import _util

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_util.os, "fsync", full)
    out = tmp_path / "schema.json"
    _assert_refused(capsys, ["config-schema", "--out", str(out)], f"--out {out}")
    assert list(tmp_path.iterdir()) == []


def test_slim_write_error_names_the_path(
    pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """slim's .pt2 is written through a file slimship opens: an OSError there names --out (not torch's
    inline_container RuntimeError), and no .partial file stays."""
    import builtins

    real_open = builtins.open
    out = tmp_path / "slim.pt2"

    def refusing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".slim.pt2.partial"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    _assert_refused(capsys, ["slim", str(pt2), "--out", str(out)], f"--out {out}")
    assert list(tmp_path.iterdir()) == []


def test_slim_writes_a_loadable_program(pt2: Path, tmp_path: Path) -> None:
    """The .pt2 slim writes through its own file handle loads back and runs."""
    out = tmp_path / "slim.pt2"
    assert main(["slim", str(pt2), "--out", str(out)]) == 0
    program = torch.export.load(str(out))
    assert program.module()(torch.randn(1, 1, 8, 8)).shape == (1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slim.pt2"]


def test_move_all_is_whole_or_nothing(tmp_path: Path) -> None:
    """A failed move removes the files already moved and names the destination that failed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    (src / "b").write_text("b")
    out = tmp_path / "out"
    out.mkdir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(SlimshipError, match=f"--out {blocker / 'b'}: could not be written"):
        move_all([(src / "a", out / "a"), (src / "b", blocker / "b")], "--out")
    assert list(out.iterdir()) == []


def test_probe_leaves_nothing(tmp_path: Path) -> None:
    """The writability probe of a good location leaves no file behind."""
    from slimship.outputs import check_output_dir, check_output_file

    check_output_file(tmp_path / "x.json", "--json")
    check_output_dir(tmp_path / "a" / "b", "--out")
    assert list(tmp_path.iterdir()) == []
    assert os.access(tmp_path, os.W_OK)
