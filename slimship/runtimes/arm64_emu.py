"""An emulated ARM64 target: the device-side runner inside aarch64 Python under qemu-user.

Phones and edge boards load the ARM64 builds of LiteRT, tflite-runtime and onnxruntime, whose kernels
differ from the x86 ones. This module runs `device_runner.py` on exactly those builds, on an x86-64
host, so accuracy and parity are checked on what a device would load, and offers that as the
`qemu-aarch64://` transport. Three modules share the work:

- `arm64_provision`: builds qemu-user, a Debian arm64 sysroot and one site directory per runtime, once,
  into a cache (`prepare_arm64`);
- `arm64_env`: the prepared environment and running its python under qemu;
- this module: the device runner on it, parity against reference outputs, and the transport.

Timings under emulation say nothing about a device: results carry them only under `emulated_*` keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship._util import atomic_write_bytes, dump_json
from slimship.compare import compare
from slimship.errors import TargetError
from slimship.runtimes.arm64_env import TIMING_NOTE, Arm64Env, process_tail, run_python
from slimship.runtimes.arm64_provision import NOT_PROVISIONED, RUNTIMES, prepare_arm64
from slimship.runtimes.transports import RunResult, register_transport

log = logging.getLogger(__name__)

_RUNNER = Path(__file__).with_name("device_runner.py")


@dataclasses.dataclass(frozen=True)
class Arm64Parity:
    """Emulated-ARM64 outputs against reference outputs.

    Decided by `slimship.compare.compare`: `max_rel_diff` is the largest absolute difference divided by
    max(1, the reference's largest finite magnitude); a NaN/Inf out of place makes it inf and fails.
    """

    runtime: str
    max_abs_diff: float
    max_rel_diff: float
    rtol: float
    passed: bool
    backend: dict[str, Any]
    qemu_version: str


# ----------------------------------------------------------------------------- running


def run_device_runner_arm64(
    env: Arm64Env,
    model: Path,
    inputs_npz: Path,
    out_json: Path,
    *,
    runtime: str,
    runs: int = 3,
    warmup: int = 1,
    threads: int | None = None,
    save_outputs: Path | None = None,
    timeout: float | None = 1800.0,
) -> dict[str, Any]:
    """Run `device_runner.py` on emulated ARM64 and return its result, with every timing marked emulated.

    The returned dict (also written back to `out_json`) has `emulated: True`, `arch: "aarch64"`,
    `qemu_version`, and the runner's timings only as `emulated_latencies_ms` / `emulated_load_ms`.
    Raises TargetError with the runner's own error text when it fails.
    """
    argv = [
        str(_RUNNER), "--model", str(model), "--inputs", str(inputs_npz), "--out", str(out_json),
        "--runtime", runtime, "--warmup", str(warmup), "--runs", str(runs),
    ]  # fmt: skip
    if threads:
        argv += ["--threads", str(threads)]
    if save_outputs is not None:
        argv += ["--save-outputs", str(save_outputs)]
    out_json = Path(out_json)
    out_json.unlink(missing_ok=True)
    proc = run_python(env, runtime, argv, timeout=timeout)
    try:
        raw = json.loads(out_json.read_text())
    except (OSError, ValueError):
        raise TargetError(
            f"the device runner on emulated ARM64 ({runtime}, {Path(model).name}) exited with code "
            f"{proc.returncode} and wrote no result: {process_tail(proc)}"
        ) from None
    if not raw.get("ok"):
        raise TargetError(
            f"the device runner on emulated ARM64 failed for {Path(model).name} with runtime {runtime!r}: "
            f"{raw.get('error', process_tail(proc))}"
        )
    result = _mark_emulated(raw, env)
    atomic_write_bytes(out_json, dump_json(result).encode())
    return result


def _mark_emulated(raw: dict[str, Any], env: Arm64Env) -> dict[str, Any]:
    result = {k: v for k, v in raw.items() if k not in ("latencies_ms", "load_ms")}
    result["emulated_latencies_ms"] = raw.get("latencies_ms", [])
    if "load_ms" in raw:
        result["emulated_load_ms"] = raw["load_ms"]
    result.update(emulated=True, arch="aarch64", qemu_version=env.qemu_version, timing_note=TIMING_NOTE)
    return result


def check_arm64_parity(
    model_path: Path,
    inputs: Sequence[np.ndarray],
    reference_outputs: Sequence[np.ndarray],
    runtime: str,
    *,
    env: Arm64Env | None = None,
    rtol: float = 1e-5,
    timeout: float | None = 1800.0,
) -> Arm64Parity:
    """Run a model once on emulated ARM64 and compare with reference (e.g. PyTorch) outputs.

    `env` defaults to `prepare_arm64(runtimes=[runtime])` (cached after the first call).
    """
    env = env or prepare_arm64(runtimes=[runtime], progress=False)
    with tempfile.TemporaryDirectory(prefix="slimship-arm64-") as tmp:
        work = Path(tmp)
        np.savez(work / "inputs.npz", **{f"in{i}": np.asarray(x) for i, x in enumerate(inputs)})
        result = run_device_runner_arm64(
            env, Path(model_path), work / "inputs.npz", work / "result.json", runtime=runtime,
            runs=0, warmup=1, save_outputs=work / "outputs.npz", timeout=timeout,
        )  # fmt: skip
        with np.load(work / "outputs.npz", allow_pickle=False) as data:
            outputs = [data[f"out{i}"] for i in range(len(data.files))]
    if len(outputs) != len(reference_outputs):
        raise TargetError(
            f"{Path(model_path).name}: emulated ARM64 run gave {len(outputs)} outputs, the reference has "
            f"{len(reference_outputs)}"
        )
    for got, ref in zip(outputs, reference_outputs, strict=True):
        if got.shape != np.shape(ref):
            raise TargetError(
                f"{Path(model_path).name}: output shape {got.shape} differs from reference {np.shape(ref)}"
            )
    check = compare(list(reference_outputs), outputs, rtol)
    if not check.passed:
        log.warning("%s: emulated ARM64 parity failed: %s", Path(model_path).name, check.reason)
    return Arm64Parity(
        runtime, check.max_abs_diff, check.max_rel_diff, rtol, check.passed, result.get("runtime", {}),
        env.qemu_version,
    )  # fmt: skip


# ----------------------------------------------------------------------------- transport shape


class Arm64EmuTransport:
    """Local-files transport onto the emulated ARM64 python: prepare / put / run / get / cleanup.

    `put` copies into a private work directory; `run(argv)` runs `python3.11 *argv` there under qemu.
    """

    def __init__(self, runtime: str, cache_dir: Path | None = None, progress: bool = False) -> None:
        self.runtime, self.cache_dir, self.progress = runtime, cache_dir, progress
        self.env: Arm64Env | None = None
        self.workdir: Path | None = None

    def prepare(self) -> None:
        self.env = prepare_arm64(self.cache_dir, runtimes=[self.runtime], progress=self.progress)
        self.workdir = Path(tempfile.mkdtemp(prefix="slimship-arm64-"))

    def _remote(self, remote: str) -> Path:
        if self.workdir is None:
            raise TargetError("Arm64EmuTransport: call prepare() first")
        path = (self.workdir / remote).resolve()
        if not path.is_relative_to(self.workdir.resolve()):
            raise TargetError(f"Arm64EmuTransport: remote path {remote!r} leaves the work directory")
        return path

    def put(self, local: Path, remote: str) -> Path:
        target = self._remote(remote)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, target)
        return target

    def run(self, argv: Sequence[str], timeout: float | None = 1800.0) -> subprocess.CompletedProcess[str]:
        if self.env is None:
            raise TargetError("Arm64EmuTransport: call prepare() first")
        return run_python(self.env, self.runtime, argv, timeout=timeout, cwd=self._remote("."))

    def get(self, remote: str, local: Path) -> Path:
        shutil.copy2(self._remote(remote), local)
        return Path(local)

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def emulated_runtime(target: Any) -> str:
    """The runtime an emulated ARM64 target runs: its own, LiteRT for `auto`; TargetError for a runtime
    not provisioned there."""
    if target.runtime == "auto":
        return "litert"
    if target.runtime not in RUNTIMES:
        why = NOT_PROVISIONED.get(target.runtime, f"provisioned runtimes: {', '.join(RUNTIMES)}")
        raise TargetError(f"target {target.name!r}: runtime {target.runtime!r} cannot run there: {why}")
    return target.runtime


class EmulatedTargetTransport(Arm64EmuTransport):
    """The Transport protocol of `slimship.runtimes.transports` over the emulated ARM64 python.

    `run_on_target` passes argv with the device's python first; here that python is always the
    emulated one, so argv[0] is replaced by it.
    """

    def __init__(self, target: Any) -> None:
        super().__init__(runtime=emulated_runtime(target), progress=True)

    def prepare(self) -> str:  # type: ignore[override]
        super().prepare()
        return str(self.workdir)

    def put(self, local: Path, remote: str) -> str:  # type: ignore[override]
        return str(super().put(local, Path(remote).name))

    def run(self, argv: Sequence[str], timeout: float | None = 1800.0) -> Any:  # type: ignore[override]
        proc = super().run(list(argv[1:]), timeout=timeout)
        return RunResult(proc.returncode, proc.stdout, proc.stderr)

    def get(self, remote: str, local: Path) -> Path:
        return super().get(Path(remote).name, local)


register_transport("qemu-aarch64", EmulatedTargetTransport)
