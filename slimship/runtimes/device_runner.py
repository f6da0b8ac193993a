#!/usr/bin/env python3
"""Self-contained model runner: needs only Python, numpy and one runtime.

The host imports this module for local runs and ships the very same file to remote devices,
where it is executed as a script and prints nothing but a JSON result file. Keep it free of
imports from slimship, torch or anything beyond numpy and the runtime it loads.

CLI contract (stable; other modules rely on it):
    python device_runner.py --model M.tflite|M.onnx --inputs inputs.npz --out result.json
        [--runtime auto|onnxruntime|litert|tflite_runtime] [--threads N]
        [--warmup W] [--runs R] [--save-outputs outputs.npz]
`inputs.npz` holds arrays named in0, in1, ... in the model's input order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

RUNTIMES = ("onnxruntime", "litert", "tflite_runtime")


class RunnerLoadError(RuntimeError):
    """The model file or the runtime could not be loaded."""


def _tflite_interpreter_class(runtime: str) -> tuple[Any, str, str]:
    if runtime in ("auto", "litert"):
        try:
            from ai_edge_litert import interpreter as litert_interpreter

            version = _dist_version("ai-edge-litert")
            return litert_interpreter.Interpreter, "litert", version
        except ImportError:
            if runtime == "litert":
                raise RunnerLoadError("runtime 'litert' requested but ai_edge_litert is not installed") from None
    try:
        from tflite_runtime import interpreter as tflite_interpreter
    except ImportError:
        raise RunnerLoadError(
            "no TFLite interpreter found: install ai-edge-litert or tflite-runtime"
        ) from None
    return tflite_interpreter.Interpreter, "tflite_runtime", _dist_version("tflite-runtime")


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


class OrtRunner:
    """onnxruntime CPU session."""

    backend = "onnxruntime"

    def __init__(self, path: str, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RunnerLoadError("runtime 'onnxruntime' is not installed") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise RunnerLoadError(f"{path}: onnxruntime cannot load this model: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.version = ort.__version__
        self.threads = threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(self.input_names, inputs, strict=True))
        return list(self.session.run(self.output_names, feed))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self.version, "threads": self.threads}


class TFLiteRunner:
    """LiteRT interpreter (ai_edge_litert), else tflite_runtime."""

    def __init__(self, path: str, threads: int | None = None, runtime: str = "auto") -> None:
        cls, self.backend, self.version = _tflite_interpreter_class(runtime)
        try:
            self.interpreter = cls(model_path=path, num_threads=threads or None)
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise RunnerLoadError(f"{path}: {self.backend} cannot load this model: {exc}") from exc
        self.inputs = self.interpreter.get_input_details()
        self.outputs = self.interpreter.get_output_details()
        self.threads = threads

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"model takes {len(self.inputs)} inputs, got {len(inputs)}")
        for detail, value in zip(self.inputs, inputs, strict=True):
            value = _quantize(value, detail)
            if tuple(detail["shape"]) != value.shape:
                self.interpreter.resize_tensor_input(detail["index"], value.shape)
                self.interpreter.allocate_tensors()
            self.interpreter.set_tensor(detail["index"], value)
        self.interpreter.invoke()
        return [_dequantize(self.interpreter.get_tensor(d["index"]), d) for d in self.outputs]

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "version": self.version, "threads": self.threads}


def _quantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(dtype, np.integer) and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale + zero_point), info.min, info.max).astype(dtype)
    return value.astype(dtype, copy=False)


def _dequantize(value: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    if np.issubdtype(value.dtype, np.integer) and scale:
        return (value.astype(np.float32) - zero_point) * scale
    return value.copy()


def open_runner(path: str, runtime: str = "auto", threads: int | None = None) -> OrtRunner | TFLiteRunner:
    """Open a runner for an .onnx or .tflite file."""
    if not os.path.isfile(path):
        raise RunnerLoadError(f"{path}: no such model file")
    if path.endswith(".onnx"):
        if runtime not in ("auto", "onnxruntime"):
            raise RunnerLoadError(f"{path}: runtime {runtime!r} cannot run ONNX files")
        return OrtRunner(path, threads)
    if path.endswith(".tflite"):
        if runtime == "onnxruntime":
            raise RunnerLoadError(f"{path}: onnxruntime cannot run TFLite files")
        return TFLiteRunner(path, threads, runtime)
    raise RunnerLoadError(f"{path}: unknown model format (expected .onnx or .tflite)")


def load_inputs(path: str) -> list[np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return [data[f"in{i}"] for i in range(len(data.files))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runtime", default="auto", choices=("auto", *RUNTIMES))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--save-outputs", default=None)
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"ok": False, "model": os.path.basename(args.model)}
    try:
        start = time.perf_counter()
        runner = open_runner(args.model, args.runtime, args.threads)
        result["load_ms"] = (time.perf_counter() - start) * 1e3
        inputs = load_inputs(args.inputs)
        outputs = runner.run(inputs)
        for _ in range(max(args.warmup - 1, 0)):
            runner.run(inputs)
        latencies = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            runner.run(inputs)
            latencies.append((time.perf_counter() - t0) * 1e3)
        result.update(ok=True, runtime=runner.describe(), latencies_ms=latencies)
        if args.save_outputs:
            np.savez(args.save_outputs, **{f"out{i}": o for i, o in enumerate(outputs)})
    except Exception as exc:  # reported to the host as data, never as a traceback
        result["error"] = f"{type(exc).__name__}: {exc}"
    tmp = args.out + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(result, handle)
    os.replace(tmp, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
