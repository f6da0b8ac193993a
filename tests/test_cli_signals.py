"""SIGTERM and SIGHUP stop a command like Ctrl-C: temporary folders are removed, nothing partial is kept,
`slimship: terminated` and exit 128 + the signal number. The handlers belong to `main` alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from slimship.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: `slimship export` whose exporter has written one file into its temporary folder and then waits
SLOW_EXPORT = """
import os, sys, time
from pathlib import Path
from types import SimpleNamespace
import slimship.cli as cli

def source(args, steps):
    return SimpleNamespace(stem="m", kind="pt2")

def export_all(args, source, out, stem, steps, reuse=None):
    (out / "m.onnx").write_bytes(b"a finished file")
    os.write(1, b"ready\\n")
    time.sleep(120)
    raise AssertionError("not stopped")

cli._source, cli._export_all = source, export_all
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_mid_export_cleans_up(sig: signal.Signals, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, "export", "x.pt2", "--format", "onnx", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert [p.name for p in tmp.iterdir() if p.name.startswith("slimship-export-")]  # the file is there
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"slimship: terminated ({sig.name})" in err
    assert "Traceback" not in err
    assert list(tmp.iterdir()) == []  # the temporary folder with the finished file is gone
    assert not out.exists()


def test_main_restores_the_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    assert main(["targets"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
