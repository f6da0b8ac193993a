"""A separate Python environment shaped like an older edge board: tflite-runtime 2.14 with numpy<2.

The host's own environment has numpy 2 and ai-edge-litert; this one has only what an older
device image has, so a model that loads here loads on such a device. Built once into a cache.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from slimship._util import folder_lock
from slimship.errors import TargetError

log = logging.getLogger(__name__)

EDGE_PACKAGES = ("tflite-runtime==2.14.0", "numpy<2")
_MARKER = ".slimship-edge-ready"


def default_cache_dir() -> Path:
    """`$SLIMSHIP_CACHE` or `~/.cache/slimship`."""
    return Path(os.environ.get("SLIMSHIP_CACHE", Path.home() / ".cache" / "slimship"))


def ensure_edge_python(cache_dir: Path | None = None) -> Path:
    """Return the python of the edge environment, creating it on first use.

    `$SLIMSHIP_EDGE_PYTHON` overrides the location (a python that has tflite_runtime and numpy<2).
    """
    override = os.environ.get("SLIMSHIP_EDGE_PYTHON")
    if override:
        return Path(override)
    cache = cache_dir or default_cache_dir()
    env_dir = cache / "edge-venv"
    python = env_dir / "bin" / "python"
    if (env_dir / _MARKER).exists() and python.exists():
        return python
    with folder_lock(cache):  # another slimship process may be building it: wait, then look again
        if not ((env_dir / _MARKER).exists() and python.exists()):
            _create(env_dir, python)
    return python


def _create(env_dir: Path, python: Path) -> None:
    log.info("creating edge environment in %s (%s)", env_dir, ", ".join(EDGE_PACKAGES))
    _run([sys.executable, "-m", "venv", "--clear", str(env_dir)], "create the edge virtualenv")
    _run([str(python), "-m", "pip", "install", "-q", *EDGE_PACKAGES], "install tflite-runtime into it")
    _run([str(python), "-c", "import tflite_runtime.interpreter, numpy"], "import tflite_runtime")
    (env_dir / _MARKER).write_text(" ".join(EDGE_PACKAGES) + "\n")


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise TargetError(
            f"could not {what} for the edge environment ({' '.join(argv[:3])} ...): "
            + " | ".join(tail)
            + ". Check that PyPI is reachable, or point SLIMSHIP_EDGE_PYTHON at a ready python."
        )
