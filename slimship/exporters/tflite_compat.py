"""Compatibility report for a .tflite file: the ops it uses, and whether given interpreters load and run
it with the same outputs (ai-edge-litert in-process; tflite-runtime 2.14 in the edge environment)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from slimship.compare import REL_BOUNDS
from slimship.errors import ModelFileError, SlimshipError
from slimship.exporters.common import (
    ParityReport,
    TensorSpec,
    check_model_file,
    compare_outputs,
    nbytes_and_hash,
    open_model_runner,
)
from slimship.runtimes.registry import runtimes_for_suffix

log = logging.getLogger(__name__)

INTERPRETERS: tuple[str, ...] = tuple(runtimes_for_suffix(".tflite"))
COMPAT_REL_BOUND = REL_BOUNDS["fp32"]
_EDGE_TIMEOUT_S = 300


@dataclasses.dataclass
class InterpreterResult:
    """One interpreter's verdict on the file."""

    interpreter: str
    version: str | None
    loaded: bool
    ran: bool
    parity: ParityReport | None
    error: str | None
    seconds: float


@dataclasses.dataclass
class CompatReport:
    """Ops used by a .tflite file and per-interpreter load / run / parity results."""

    path: Path
    bytes: int
    sha256: str
    ops: dict[str, int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    results: list[InterpreterResult]
    compatible: bool


def _interpreter(path: str | Path):
    """An ai_edge_litert Interpreter for reading the file (not allocated: ops stay un-delegated)."""
    check_model_file(path)
    from ai_edge_litert import interpreter as litert

    try:
        return litert.Interpreter(model_path=str(path))
    except Exception as exc:
        raise ModelFileError(
            f"{path}: not a loadable TFLite model ({type(exc).__name__}: {str(exc).strip()[:200]}); "
            "the file is corrupt or truncated: convert it again"
        ) from None


def read_ops(path: str | Path) -> dict[str, int]:
    """Builtin/custom op name -> count, read from the flatbuffer via the interpreter's op details."""
    details = _interpreter(path)._get_ops_details()
    return dict(sorted(Counter(d["op_name"] for d in details).items()))


def default_rel_bound(path: str | Path) -> float:
    """Cross-runtime parity bound for this file (see `tflite_compatibility`)."""
    interp = _interpreter(path)
    out_scales = [float(d["quantization"][0]) for d in interp.get_output_details() if d["quantization"][0]]
    if out_scales:
        return max(COMPAT_REL_BOUND, 2 * max(out_scales))
    if any(np.dtype(d["dtype"]) == np.int8 for d in interp.get_tensor_details()):
        return 1e-2
    return COMPAT_REL_BOUND


def tflite_precision(path: str | Path) -> str:
    """The variant a .tflite file is, read from its tensors (a key of `slimship.compare.REL_BOUNDS`).

    int8: integer inputs/outputs or no float32 tensor at all (full-integer); int8-dynamic: int8 weights
    with float activations; fp16: float16 weights; fp32 otherwise.
    """
    interp = _interpreter(path)
    kinds = {np.dtype(d["dtype"]).name for d in interp.get_tensor_details()}
    io = interp.get_input_details() + interp.get_output_details()
    if kinds & {"int8", "uint8", "int16"}:
        quantized_io = any(
            np.issubdtype(np.dtype(d["dtype"]), np.integer) and d["quantization"][0] for d in io
        )
        return "int8" if quantized_io or "float32" not in kinds else "int8-dynamic"
    return "fp16" if "float16" in kinds else "fp32"


def tensor_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    interp = _interpreter(path)

    def spec(d: dict[str, Any]) -> TensorSpec:
        scale, zero = d.get("quantization", (0.0, 0))
        quantised = np.issubdtype(d["dtype"], np.integer) and scale
        return TensorSpec(d["name"], [int(x) for x in d["shape"]], np.dtype(d["dtype"]).name,
                          (float(scale), int(zero)) if quantised else None)  # fmt: skip

    return [spec(d) for d in interp.get_input_details()], [spec(d) for d in interp.get_output_details()]


def tflite_compatibility(
    path: str | Path,
    *,
    interpreters: tuple[str, ...] = INTERPRETERS,
    inputs: list[np.ndarray] | None = None,
    reference: list[np.ndarray] | None = None,
    rel_bound: float | None = None,
) -> CompatReport:
    """Report the ops of `path` and whether each interpreter loads and runs it.

    `inputs`: arrays in signature-argument order (random ones from the input details if None).
    `reference`: expected outputs (e.g. PyTorch's); if None, every interpreter is compared with the
    first one that ran. Parity: max|diff| <= rel_bound * max(1, max|reference|); by default rel_bound
    is 1e-4 for float models, 1e-2 when int8 weights are present (dynamic-range kernels differ between
    runtime versions) and 2 output quantization steps for int8 outputs.
    """
    path = Path(path)
    ops = read_ops(path)
    rel_bound = default_rel_bound(path) if rel_bound is None else rel_bound
    in_specs, out_specs = tensor_specs(path)
    unknown = set(interpreters) - set(INTERPRETERS)
    if unknown:
        raise SlimshipError(f"unknown interpreter(s) {sorted(unknown)}: choose from {INTERPRETERS}")
    arg_order = input_order([s.name for s in in_specs]) or list(range(len(in_specs)))
    out_order = output_order([s.name for s in out_specs])
    if inputs is None:
        inputs = _random_inputs(in_specs, arg_order)
    feed = [np.asarray(inputs[i]) for i in arg_order]  # interpreter input order

    results = []
    baseline = reference
    for name in interpreters:
        start = time.perf_counter()
        version, outputs, error, loaded = _run_one(name, path, feed)
        if outputs is not None and out_order:
            outputs = [outputs[out_order.index(i)] for i in range(len(outputs))]
        parity = None
        if outputs is not None:
            if baseline is None:
                baseline = outputs
            parity = compare_outputs([list(baseline)], [outputs], [name], rel_bound)
        results.append(
            InterpreterResult(
                interpreter=name,
                version=version,
                loaded=loaded,
                ran=outputs is not None,
                parity=parity,
                error=error,
                seconds=round(time.perf_counter() - start, 3),
            )
        )
    nbytes, digest = nbytes_and_hash(path)
    compatible = bool(results) and all(r.ran and r.parity is not None and r.parity.passed for r in results)
    return CompatReport(path, nbytes, digest, ops, in_specs, out_specs, results, compatible)


def _random_inputs(specs: list[TensorSpec], arg_order: list[int]) -> list[np.ndarray]:
    """Random float inputs (quantized inputs are quantized by the runner), in argument order."""
    rng = np.random.default_rng(0)
    by_arg: list[np.ndarray] = [np.empty(0)] * len(specs)
    for position, spec in enumerate(specs):
        shape = [max(int(d), 1) for d in spec.shape]
        if np.issubdtype(np.dtype(spec.dtype), np.integer) and spec.dtype not in ("int8", "uint8", "int16"):
            value = rng.integers(0, 2, size=shape).astype(spec.dtype)
        else:
            value = rng.standard_normal(shape).astype(np.float32)
        by_arg[arg_order[position]] = value
    return by_arg


def _run_one(
    name: str, path: Path, feed: list[np.ndarray]
) -> tuple[str | None, list[np.ndarray] | None, str | None, bool]:
    """(version, outputs or None, error or None, loaded) for one interpreter."""
    if name == "litert":
        try:
            runner = open_model_runner(path, runtime="litert")
        except SlimshipError as exc:
            return None, None, str(exc), False
        try:
            return runner.version, runner.run(feed), None, True
        except Exception as exc:
            return runner.version, None, f"{type(exc).__name__}: {exc}", True
    return _run_edge(path, feed)


def _run_edge(
    path: Path, feed: list[np.ndarray]
) -> tuple[str | None, list[np.ndarray] | None, str | None, bool]:
    """Run the file with tflite-runtime 2.14 (numpy<2) in the edge python, via device_runner.py."""
    from slimship.runtimes import device_runner
    from slimship.runtimes.edge_env import ensure_edge_python

    try:
        python = ensure_edge_python()
    except SlimshipError as exc:
        return None, None, f"edge environment unavailable: {exc}", False
    with tempfile.TemporaryDirectory(prefix="slimship-compat-") as tmp:
        inputs_npz, result_json, outputs_npz = (Path(tmp) / n for n in ("in.npz", "result.json", "out.npz"))
        np.savez(inputs_npz, **{f"in{i}": a for i, a in enumerate(feed)})
        argv = [
            str(python), device_runner.__file__, "--model", str(path), "--inputs", str(inputs_npz),
            "--out", str(result_json), "--runtime", "tflite_runtime", "--warmup", "1", "--runs", "1",
            "--save-outputs", str(outputs_npz),
        ]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=_EDGE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return None, None, f"tflite_runtime did not finish within {_EDGE_TIMEOUT_S} s", False
        if not result_json.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            return None, None, f"the edge runner crashed (exit {proc.returncode}): {tail}", False
        result = json.loads(result_json.read_text())
        version = (result.get("runtime") or {}).get("version")
        if not result.get("ok"):
            error = result.get("error", "unknown error")
            return version, None, error, "cannot load" not in error and "RunnerLoadError" not in error
        with np.load(outputs_npz, allow_pickle=False) as data:
            outputs = [data[f"out{i}"] for i in range(len(data.files))]
    return version, outputs, None, True


def output_order(names: list[str]) -> list[int] | None:
    """Output index per interpreter output position, from names like `serving_default_output_<i>...`."""
    order = []
    for name in names:
        match = re.search(r"output_(\d+)", name)
        if not match:
            return None
        order.append(int(match.group(1)))
    return order if sorted(order) == list(range(len(order))) else None


def input_order(names: list[str]) -> list[int] | None:
    """Argument index per interpreter input position, from names like `serving_default_args_<i>`."""
    order = []
    for name in names:
        tail = name.rsplit("args_", 1)
        if len(tail) != 2 or not tail[1].split(":")[0].isdigit():
            return None
        order.append(int(tail[1].split(":")[0]))
    return order if sorted(order) == list(range(len(order))) else None
