"""The one table of runtimes: every place that lists, detects or dispatches on a runtime reads it.

A record says what a runtime is called, which file suffixes it opens, the Python module that tells
whether it is installed here, and what a device needs to run it. The runner itself lives in
`device_runner.py` (self-contained, shipped to devices) under the same name.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from slimship.errors import TargetError


@dataclasses.dataclass(frozen=True)
class RuntimeRecord:
    """One inference runtime."""

    name: str
    suffixes: tuple[str, ...]
    module: str  # importable module whose presence means the runtime is installed
    device_needs: str
    times_alignment: bool = True  # its kernels can be swept for a favoured channel multiple

    def available(self) -> bool:
        """True when the runtime's Python package is importable in this process."""
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False


RUNTIMES: dict[str, RuntimeRecord] = {
    record.name: record
    for record in (
        RuntimeRecord("onnxruntime", (".onnx",), "onnxruntime",
                      "Python 3, numpy and onnxruntime (pip install onnxruntime)"),
        RuntimeRecord("litert", (".tflite",), "ai_edge_litert",
                      "Python 3, numpy and ai-edge-litert (pip install ai-edge-litert)"),
        RuntimeRecord("tflite_runtime", (".tflite",), "tflite_runtime",
                      "Python 3, numpy<2 and tflite-runtime 2.14 (pip install tflite-runtime 'numpy<2')"),
        RuntimeRecord("executorch", (".pte",), "executorch.runtime",
                      "Python 3, numpy, torch and executorch (its Python runtime imports torch)"),
    )
}  # fmt: skip

RUNTIME_NAMES: tuple[str, ...] = tuple(RUNTIMES)


def get_runtime(name: str) -> RuntimeRecord:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise TargetError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}") from None


def runtimes_for_suffix(suffix: str) -> list[str]:
    """Runtimes that open files with this suffix, in preference order."""
    return [name for name, record in RUNTIMES.items() if suffix.lower() in record.suffixes]


def default_runtime(suffix: str) -> str | None:
    """The first installed runtime that opens `suffix` files, else the first that could."""
    names = runtimes_for_suffix(suffix)
    installed = [n for n in names if RUNTIMES[n].available()]
    return (installed or names or [None])[0]
