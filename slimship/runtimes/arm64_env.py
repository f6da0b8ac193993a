"""Emulated ARM64 basics: a prepared environment and running its python under qemu-user.

`arm64_provision` builds the environment; `arm64_emu` runs slimship's device runner on it and offers it
as a target transport.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from slimship.errors import TargetError

QEMU_CPU = "neoverse-n1"  # without it numpy reports false FP exceptions; also 2-3x faster than `max`
TIMING_NOTE = (
    "Measured under qemu-user emulation of aarch64 on an x86-64 host: these timings are NOT device "
    "latencies and must not be compared with or reported as such."
)


@dataclasses.dataclass(frozen=True)
class Arm64Env:
    """A prepared emulated ARM64 environment (all paths local)."""

    root: Path
    qemu: Path
    sysroot: Path
    site_dirs: dict[str, Path]
    versions: dict[str, str]

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.11"

    @property
    def qemu_version(self) -> str:
        return self.versions.get("qemu", "unknown")


def run_python(
    env: Arm64Env,
    runtime: str | None,
    argv: Sequence[str],
    timeout: float | None = 600.0,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python3.11 *argv` on emulated aarch64 with `runtime`'s site dir on PYTHONPATH (None: no site dir).

    Returns the completed process (text output); raises TargetError on a timeout.
    """
    site = None
    if runtime is not None:
        site = env.site_dirs.get(runtime)
        if site is None:
            raise TargetError(
                f"runtime {runtime!r} was not prepared for ARM64 emulation "
                f"(prepared: {sorted(env.site_dirs)}); "
                f"call prepare_arm64(runtimes=[..., {runtime!r}])"
            )
    return emulate(env.qemu, env.sysroot, site, argv, timeout, cwd)


def emulate(
    qemu: Path,
    sysroot: Path,
    site: Path | None,
    argv: Sequence[str],
    timeout: float | None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    python = sysroot / "usr" / "bin" / "python3.11"
    full = [str(qemu), "-L", str(sysroot), "-cpu", QEMU_CPU, str(python), *map(str, argv)]
    child_env = {  # a clean environment: nothing of the host's Python setup leaks in
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "QEMU_CPU": QEMU_CPU,
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if site is not None:
        child_env["PYTHONPATH"] = str(site)
    try:
        return subprocess.run(
            full, capture_output=True, text=True, env=child_env, cwd=cwd, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetError(
            f"emulated ARM64 python timed out after {timeout} s running {list(argv)[:3]}; emulation is "
            "slow (a 1 GMAC model takes about a minute per inference): raise the timeout or use fewer runs"
        ) from exc


def process_tail(proc: subprocess.CompletedProcess[str], lines: int = 6, errors_first: bool = False) -> str:
    text = ((proc.stderr or "") + "\n" + (proc.stdout or "")).strip().splitlines()
    text = [line for line in text if line.strip() and not line.startswith("WARNING: Location")]
    errors = [line for line in text if line.startswith("E:")]
    if errors_first and errors:
        text = errors
    return " | ".join(text[-lines:]) or f"exit code {proc.returncode}"
