"""The edge environment is built once when several slimship processes (or threads) ask for it at once:
the second waits on the cache folder's lock, then finds it ready."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from slimship.runtimes import edge_env


def test_concurrent_requests_build_the_edge_environment_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLIMSHIP_EDGE_PYTHON", raising=False)
    builds: list[Path] = []

    def create(env_dir: Path, python: Path) -> None:  # a slow build, as venv + pip install are
        builds.append(env_dir)
        time.sleep(0.5)
        python.parent.mkdir(parents=True)
        python.write_text("")
        (env_dir / edge_env._MARKER).write_text("ready\n")

    monkeypatch.setattr(edge_env, "_create", create)
    got: list[Path] = []
    ask = lambda: got.append(edge_env.ensure_edge_python(tmp_path))  # noqa: E731
    threads = [threading.Thread(target=ask) for _ in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(builds) == 1
    assert got == [tmp_path / "edge-venv" / "bin" / "python"] * 2
