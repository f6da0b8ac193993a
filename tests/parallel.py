"""What keeps test processes apart when they run at once (pytest-xdist workers, or two pytest runs):
ports handed out by the OS, and machine-wide locks around what the machine has only one of."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port the OS just handed out (bound to port 0, then released), not a guessed one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Hold the machine-wide lock `name` (apt/dpkg, a cache outside tmp_path); other processes wait."""
    path = Path(tempfile.gettempdir()) / f"slimship-tests-{name}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
