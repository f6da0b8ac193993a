"""The command's entry: a stop signal while its modules are still importing ends cleanly (no traceback),
and `import slimship` alone loads neither torch nor the exporters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: runs the entry with `slimship.cli` made to import slowly (a finder that sleeps), after saying so
SLOW_IMPORT = """
import importlib.abc, os, sys, time

class SlowCli(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "slimship.cli":
            os.write(1, b"importing\\n")
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowCli())
from slimship._entry import main
sys.exit(main())
"""


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [(signal.SIGINT, 130, "slimship: interrupted"), (signal.SIGTERM, 143, "slimship: terminated (SIGTERM)"),
     (signal.SIGHUP, 129, "slimship: terminated (SIGHUP)")],
)  # fmt: skip
def test_stop_signal_while_importing(sig: signal.Signals, code: int, said: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_IMPORT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"importing\n"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    text = err.decode()
    assert proc.returncode == code, text
    assert said in text and "Traceback" not in text


def test_import_slimship_is_light() -> None:
    code = "import sys, slimship; print('torch' in sys.modules); slimship.slim; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.stdout.split() == ["False", "True"], done.stderr
