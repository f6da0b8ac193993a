"""Run device_runner.py on a target through its transport and read the JSON result back.

Every target, local ones included, runs the model in a separate process started from the same
self-contained script, so thread count, CPU affinity and peak memory are those of that process.
Host-side staging happens in a temp directory that is removed afterwards: a failed run leaves no
partial result file on the host.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import DeviceError, ModelFileError, TargetError
from slimship.runtimes import device_runner
from slimship.runtimes.targets import Target
from slimship.runtimes.transports import host_python, open_transport

log = logging.getLogger(__name__)
RUNNER_NAME = "slimship_device_runner.py"
_TIMEOUT_EXIT = 124  # coreutils `timeout`


@dataclass
class DeviceRun:
    """What one device_runner invocation returned: its JSON and (optionally) outputs per model."""

    result: dict[str, Any]
    outputs: list[list[np.ndarray]] = field(default_factory=list)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def as_array_list(inputs: Any) -> list[np.ndarray]:
    if isinstance(inputs, np.ndarray):
        return [inputs]
    return [np.asarray(x) for x in inputs]


def runner_argv(target: Target, python: str, runner: str, models: list[str], files: dict[str, str], *,
                warmup: int, runs: int, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The device_runner command line for a target (argv list, never a string); `extra`: further options
    (e.g. `--task text-generation ...`)."""
    argv = [python, runner]
    for model in models:
        argv += ["--model", model]
    argv += ["--inputs", files["inputs"], "--out", files["out"], "--runtime", target.runtime]
    argv += ["--warmup", str(warmup), "--runs", str(runs), "--xnnpack", "on" if target.xnnpack else "off"]
    if target.threads:
        argv += ["--threads", str(target.threads)]
    if target.affinity:
        argv += ["--affinity", ",".join(map(str, target.affinity))]
    if "eval" in files:
        argv += ["--eval", files["eval"]]
    if "outputs" in files:
        argv += ["--save-outputs", files["outputs"]]
    return argv + list(extra)


def run_on_target(
    target: Target,
    models: list[Path],
    inputs: Any,
    *,
    warmup: int = 5,
    runs: int = 50,
    eval_inputs: list[list[np.ndarray]] | None = None,
    save_outputs: bool = False,
    staging_dir: Path | None = None,
    extra_args: Sequence[str] = (),
) -> DeviceRun:
    """Ship device_runner, models and inputs to `target`, run them (interleaved if several), read back."""
    models = [Path(m) for m in models]
    for m in models:
        if not m.is_file():
            raise ModelFileError(f"{m}: no such model file")
    if len({m.name for m in models}) != len(models):
        models_named = [f"m{k}_{m.name}" for k, m in enumerate(models)]
    else:
        models_named = [m.name for m in models]
    if staging_dir is not None:
        Path(staging_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slimship-stage-", dir=staging_dir) as tmp:
        stage = Path(tmp)
        npz = {
            "inputs": _write_npz(
                stage / "inputs.npz", {f"in{i}": x for i, x in enumerate(as_array_list(inputs))}
            )
        }
        if eval_inputs:
            arrays = {f"b{b}_in{j}": x for b, batch in enumerate(eval_inputs) for j, x in enumerate(batch)}
            npz["eval"] = _write_npz(stage / "eval.npz", arrays)
        transport = open_transport(target)
        try:
            workdir = transport.prepare()
            runner = transport.put(Path(device_runner.__file__), RUNNER_NAME)
            shipped = [_self_contained(m, stage / f"model{k}") for k, m in enumerate(models)]
            remote_models = [transport.put(m, name) for m, name in zip(shipped, models_named, strict=True)]
            files = {key: transport.put(path, path.name) for key, path in npz.items()}
            files["out"] = f"{workdir}/result.json"
            if save_outputs:
                files["outputs"] = f"{workdir}/outputs.npz"
            python = target.python or host_python()
            argv = runner_argv(target, python, runner, remote_models, files, warmup=warmup, runs=runs,
                               extra=extra_args)  # fmt: skip
            log.debug("target %s: %s", target.name, argv)
            proc = transport.run(argv, timeout=target.run_timeout)
            copies = dict(zip(remote_models, models, strict=True))  # errors name the user's files
            result = _fetch_result(transport, target, proc, files["out"], stage / "result.json", copies)
            outputs: list[list[np.ndarray]] = []
            if save_outputs:
                local = transport.get(files["outputs"], stage / "outputs.npz")
                outputs = _split_outputs(local, len(models))
        finally:
            transport.cleanup()
    return DeviceRun(result, outputs)


def _fetch_result(
    transport: Any, target: Target, proc: Any, remote: str, local: Path, copies: dict[str, Path] | None = None
) -> dict[str, Any]:
    """The device's result.json; a failure is an error naming the user's model file, not its copy."""
    where = f"target {target.name!r} ({target.transport})"
    if proc.returncode == _TIMEOUT_EXIT and target.scheme != "local":
        raise DeviceError(f"{where}: the run exceeded run_timeout={target.run_timeout:g} s and was stopped")
    if proc.returncode == 127:
        raise TargetError(
            f"{where}: python {target.python!r} not found on the device; set `python:` in the target"
        )
    if proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr:
        missing = proc.stderr.strip().splitlines()[-1]
        raise TargetError(
            f"{where}: the device's python {target.python!r} lacks a module ({missing}); install it there"
        )
    if proc.returncode not in (0, 1):
        raise DeviceError(
            f"{where}: device runner exited with status {proc.returncode}: {proc.stderr.strip()[-500:]}"
        )
    transport.get(remote, local)
    try:
        result = json.loads(local.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DeviceError(f"{where}: the device returned an unreadable result: {exc}") from exc
    if not result.get("ok"):
        error = str(result.get("error", "unknown error"))
        for copy, model in (copies or {}).items():
            error = error.replace(copy, str(model))
        detail = error.split(": ", 1)[-1]
        if error.startswith("RunnerLoadError") and (
            "not installed" in error or "no TFLite interpreter" in error
        ):
            raise TargetError(f"{where}: {detail}. Install the runtime there or pick another target.")
        if error.startswith("RunnerLoadError"):
            raise TargetError(f"{where}: {detail}. Re-export the model or pick another runtime.")
        raise DeviceError(f"{where}: the model failed on the device: {error}")
    return result


def _self_contained(model: Path, stage: Path) -> Path:
    """An ONNX model with external data is rewritten into one file so it can be shipped alone."""
    if model.suffix != ".onnx":
        return model
    import onnx
    from onnx.external_data_helper import uses_external_data

    proto = onnx.load_model(str(model), load_external_data=False)
    if not any(uses_external_data(t) for t in proto.graph.initializer):
        return model
    stage.mkdir(exist_ok=True)
    try:
        out = stage / model.name
        onnx.save_model(onnx.load_model(str(model)), str(out))
    except Exception as exc:  # e.g. over protobuf's 2 GB limit
        raise ModelFileError(
            f"{model}: cannot inline its external data for shipping ({exc}); export one file"
        ) from exc
    return out


def _split_outputs(path: Path, n_models: int) -> list[list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        per_model = []
        for k in range(n_models):
            prefix = "" if k == 0 else f"m{k}_"
            count = sum(1 for n in names if n.startswith(f"{prefix}out") and n[len(prefix) + 3 :].isdigit())
            per_model.append([data[f"{prefix}out{i}"] for i in range(count)])
    return per_model
