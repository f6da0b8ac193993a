"""A release killed mid-write leaves no staging folder behind, or the next release removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from slimship.pipeline.release import ReleaseInputs, remove_stale_staging, write_release

ROOT = Path(__file__).resolve().parents[2]

# Writes a release whose bundle step signals `ready` and then waits: the staging folder exists meanwhile.
WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from torch import nn
    import slimship.pipeline.release as release

    out, ready = Path(sys.argv[1]), Path(sys.argv[2])

    def stalled_bundle(inputs, bundle):
        (bundle / "model.pt2").write_bytes(b"half-written")
        ready.write_text("staged")
        time.sleep(120)

    release._write_bundle = stalled_bundle
    inputs = release.ReleaseInputs(
        name="t", version="1.0.0", slim_module=nn.Linear(4, 2).eval(), example_inputs=(torch.ones(1, 4),),
        model_files={}, reference={"source_sha256": "0" * 64}, slimming={}, parity={}, accuracy={},
        latency={}, config={},
    )
    release.write_release(inputs, out)
    """
)


def _inputs(version: str = "1.0.0") -> ReleaseInputs:
    torch.manual_seed(0)
    return ReleaseInputs(
        name="t", version=version, slim_module=nn.Linear(4, 2).eval(), example_inputs=(torch.ones(1, 4),),
        model_files={}, reference={"source_sha256": "0" * 64}, slimming={}, parity={}, accuracy={},
        latency={}, config={},
    )  # fmt: skip


def _start_writer(out: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out), str(ready)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the writer never reached the bundle step: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return proc


def _staging(out: Path) -> list[Path]:
    return sorted(out.glob(".*.partial"))


def test_sigterm_mid_write_removes_the_staging_folder(tmp_path) -> None:
    out = tmp_path / "releases"
    proc = _start_writer(out, tmp_path)
    [staging] = _staging(out)
    assert f".{proc.pid}." in staging.name  # the staging folder records its writer
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []


def test_the_next_release_removes_a_killed_writers_staging_folder(tmp_path) -> None:
    out = tmp_path / "releases"
    proc = _start_writer(out, tmp_path)
    proc.kill()  # SIGKILL: no handler runs, the staging folder stays
    proc.communicate(timeout=60)
    [left] = _staging(out)
    live = out / f".t-0.9.0.{os.getppid()}.abc123.partial"  # a live process's staging folder
    live.mkdir()
    unrelated = out / ".notes.partial"
    unrelated.mkdir()
    result = write_release(_inputs(), out)
    assert result.bundle_dir.is_dir() and not left.exists()
    assert live.is_dir() and unrelated.is_dir()
    assert remove_stale_staging(out) == []


def test_the_previous_sigterm_handler_is_restored(tmp_path) -> None:
    def mine(signum, frame) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        write_release(_inputs(), tmp_path)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
