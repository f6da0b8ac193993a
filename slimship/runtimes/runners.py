"""The Runner protocol and in-process runners for onnxruntime, LiteRT and ExecuTorch.

These wrap the classes of `device_runner` (which stays self-contained for shipping to devices)
behind `load(path)`, `run(inputs)`, `describe()`. The torch reference runner lives in
`slimship.runtimes.torch_runner` so that importing this module never imports torch.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from slimship.errors import ModelFileError, TargetError
from slimship.runtimes import device_runner
from slimship.runtimes.registry import RUNTIMES, runtimes_for_suffix


@runtime_checkable
class Runner(Protocol):
    """Loads one model and runs it on lists of numpy arrays."""

    def load(self, path: str | Path) -> Runner: ...

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...

    def describe(self) -> dict[str, Any]: ...


class _DeviceRunnerBackend:
    runtime = "auto"

    def __init__(self, threads: int | None = None, xnnpack: bool = True) -> None:
        self.threads, self.xnnpack = threads, xnnpack
        self._impl: Any = None

    def load(self, path: str | Path) -> _DeviceRunnerBackend:
        path = str(path)
        if not Path(path).is_file():
            raise ModelFileError(f"{path}: no such model file")
        probe_load(path, self.runtime)
        try:
            self._impl = device_runner.open_runner(path, self.runtime, self.threads, self.xnnpack)
        except device_runner.RunnerLoadError as exc:
            raise TargetError(str(exc)) from exc
        return self

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if self._impl is None:
            raise TargetError(f"{type(self).__name__}: call load(path) before run()")
        return self._impl.run(list(inputs))

    def describe(self) -> dict[str, Any]:
        return self._impl.describe() if self._impl else {"backend": self.runtime, "loaded": False}


class OnnxRuntimeRunner(_DeviceRunnerBackend):
    runtime = "onnxruntime"


class LiteRTRunner(_DeviceRunnerBackend):
    """ai_edge_litert if installed, else tflite_runtime."""

    runtime = "auto"


def runner_for(path: str | Path, threads: int | None = None, xnnpack: bool = True) -> Runner:
    """An in-process runner chosen by file extension (the runtime registry's suffixes), already loaded."""
    suffix = Path(path).suffix.lower()
    if suffix in (".pt2", ".pt"):
        from slimship.runtimes.torch_runner import TorchRunner

        return TorchRunner().load(path)
    if not runtimes_for_suffix(suffix):
        known = sorted({s for r in RUNTIMES.values() for s in r.suffixes} | {".pt2"})
        raise ModelFileError(f"{path}: unknown model format; expected one of {', '.join(known)}")
    return _DeviceRunnerBackend(threads, xnnpack).load(path)  # device_runner picks the runtime by suffix


# A native runtime can abort the process on a hostile file (ExecuTorch: SIGABRT on a garbage .pte), so a file
# is first opened by a child process; only a file the child opened cleanly (or refused with an exception) is
# opened in this process. One probe per file (path, size, mtime) and runtime per process.
_PROBE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('device_runner', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
    "try:\n    module.open_runner(sys.argv[2], sys.argv[3])\n"
    "except module.RunnerLoadError:\n    sys.exit(3)\n"
)
PROBE_TIMEOUT = 300.0
_probed: set[tuple[str, int, int, str]] = set()


def probe_load(path: str | Path, runtime: str = "auto") -> None:
    """Open `path` with `runtime` in a child process first: ModelFileError when the runtime crashes (a
    signal) or hangs loading it; a load error the runtime reports is left to the in-process load to name."""
    p = Path(path)
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns, runtime)
    if key in _probed:
        return
    argv = [sys.executable, "-c", _PROBE, device_runner.__file__, str(p), runtime]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"{p}: the {runtime} runtime did not load it in {PROBE_TIMEOUT:.0f} s") from None
    if done.returncode < 0:
        number = -done.returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else "unknown"
        what = "a runtime" if runtime == "auto" else f"the {runtime} runtime"
        raise ModelFileError(
            f"{what} crashed loading {p} (signal {number}, {name}); the file is corrupt, truncated or not a "
            "model of this format: export it again"
        )
    _probed.add(key)
