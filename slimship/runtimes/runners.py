"""The Runner protocol and in-process runners for onnxruntime, LiteRT and ExecuTorch.

These wrap the classes of `device_runner` (which stays self-contained for shipping to devices)
behind `load(path)`, `run(inputs)`, `describe()`. The torch reference runner lives in
`slimship.runtimes.torch_runner` so that importing this module never imports torch.
"""

from __future__ import annotations

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
