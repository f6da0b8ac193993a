"""Provisioning of the emulated ARM64 target: qemu-user, an arm64 sysroot and one site directory per runtime.

Phones and edge boards load the ARM64 builds of LiteRT, tflite-runtime and onnxruntime, whose kernels
differ from the x86 ones. This module runs `device_runner.py` on exactly those builds, on an x86-64
host, so accuracy and parity are checked on what a device would load:

- `qemu-aarch64` (static, qemu-user >= 10 from Debian bookworm-backports; the 7.2 in bookworm shows
  the host's /proc/cpuinfo and the runtimes crash at start-up),
- a Debian bookworm arm64 sysroot with python3.11 (packages unpacked with `dpkg -x`, nothing installed),
- one site directory per runtime (ARM64 wheels from PyPI, unzipped): each runtime needs its own numpy.

Everything is built once into a cache (`prepare_arm64`), each part in a temp directory renamed into
place with a ready-marker that records versions. Apt runs with a private configuration (own sources,
state and cache directories); the system's apt setup is never touched.

Timings under emulation say nothing about a device: results carry them only under `emulated_*` keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from slimship._util import atomic_write_bytes, dump_json, folder_lock
from slimship.errors import TargetError
from slimship.runtimes.arm64_env import Arm64Env, emulate, process_tail
from slimship.runtimes.edge_env import default_cache_dir
from slimship.runtimes.registry import RUNTIME_NAMES

log = logging.getLogger(__name__)

DEBIAN_SUITE = "bookworm"
QEMU_SUITE = "bookworm-backports"
QEMU_PACKAGE = "qemu-user"
SYSROOT_PACKAGES = (
    "python3.11",
    "libpython3.11-stdlib",
    "libpython3.11-minimal",
    "libstdc++6",
    "libgcc-s1",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libssl3",
)
# bookworm arm64 has glibc 2.36: every manylinux tag up to 2_36 loads there.
WHEEL_PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)))
# What each site directory holds; `None` pins to the version installed on the host (same release, other arch).
RUNTIME_WHEELS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "litert": (("ai-edge-litert", None), ("numpy", "")),
    "tflite_runtime": (("tflite-runtime", "==2.14.0"), ("numpy", "<2")),
    "onnxruntime": (("onnxruntime", None), ("numpy", "")),
}
RUNTIME_IMPORTS = {
    "litert": "ai_edge_litert.interpreter",
    "tflite_runtime": "tflite_runtime.interpreter",
    "onnxruntime": "onnxruntime",
}
# ExecuTorch is not provisioned: its Python runtime imports torch, not set up under qemu here
RUNTIMES = tuple(name for name in RUNTIME_NAMES if name in RUNTIME_WHEELS)
NOT_PROVISIONED = {
    "executorch": "ExecuTorch is not provisioned on the emulated ARM64 target (its Python runtime needs "
    "torch, which slimship does not install under qemu); run .pte files on an ARM64 device over ssh://"
}
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_MARKER = ".slimship-ready.json"


# ----------------------------------------------------------------------------- preparation


def prepare_arm64(
    cache_dir: Path | None = None,
    runtimes: Sequence[str] = RUNTIMES,
    progress: bool = True,
    *,
    debian_mirror: str | None = None,
    security_mirror: str | None = None,
) -> Arm64Env:
    """Prepare qemu, the arm64 sysroot and one site directory per runtime, once, into a cache.

    `cache_dir` defaults to `default_cache_dir() / "arm64"`. Parts already prepared are reused; an
    interrupted run leaves only temp directories, cleaned on the next call. Mirrors default to
    `$SLIMSHIP_DEBIAN_MIRROR` / `$SLIMSHIP_DEBIAN_SECURITY_MIRROR`, else the system's Debian apt sources.
    """
    for runtime in runtimes:
        if runtime in NOT_PROVISIONED:
            raise TargetError(NOT_PROVISIONED[runtime])
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise TargetError(f"unknown ARM64 runtime(s) {unknown}; choose from {list(RUNTIMES)}")
    _check_host()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "arm64"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TargetError(
            f"cannot create the ARM64 cache directory {root}: {exc}; pass another cache_dir"
        ) from exc
    mirrors = _Mirrors.resolve(debian_mirror, security_mirror)
    parts: list[tuple[str, dict[str, Any], Callable[[Path], dict[str, str]]]] = [
        ("qemu", {"package": QEMU_PACKAGE, "suite": QEMU_SUITE}, lambda d: _build_qemu(d, mirrors)),
        (
            "sysroot",
            {"packages": SYSROOT_PACKAGES, "suite": DEBIAN_SUITE},
            lambda d: _build_sysroot(d, mirrors, root / "qemu" / "qemu-aarch64"),
        ),
    ]
    for runtime in runtimes:
        specs = _wheel_specs(runtime)
        parts.append(
            (
                f"site-{runtime}",
                {"wheels": specs, "platforms": WHEEL_PLATFORMS},
                _site_builder(root, runtime, specs),
            )
        )
    with folder_lock(root), _Steps(progress, len(parts)) as steps:
        _clean_stale_temps(root)
        versions: dict[str, str] = {}
        for name, recipe, build in parts:
            steps.start(name)
            versions.update(_ensure_part(root, name, recipe, build))
            steps.done()
    qemu, sysroot = root / "qemu" / "qemu-aarch64", root / "sysroot"
    env = Arm64Env(root, qemu, sysroot, {r: root / f"site-{r}" for r in runtimes}, versions)
    log.info(
        "ARM64 emulation ready in %s (%s)", root, ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    )
    return env


def _check_host() -> None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise TargetError(
            f"the emulated ARM64 target needs an x86-64 Linux host (this is {platform.system()} "
            f"{platform.machine()}); on an ARM64 Linux host run device_runner.py natively instead"
        )
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise TargetError(
                f"the emulated ARM64 target needs `{tool}` (Debian/Ubuntu host); it is not on PATH"
            )
    if not DEBIAN_KEYRING.is_file():
        raise TargetError(f"{DEBIAN_KEYRING} is missing: install the `debian-archive-keyring` package")


def _ensure_part(
    root: Path, name: str, recipe: dict[str, Any], build: Callable[[Path], dict[str, str]]
) -> dict[str, str]:
    """Return the versions of a ready part, building it into a temp dir and renaming it in if needed."""
    final = root / name
    marker = _read_marker(final)
    recipe_json = json.loads(json.dumps(recipe))
    if marker is not None and marker.get("recipe") == recipe_json:
        return marker["versions"]
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    tmp.chmod(0o755)
    try:
        versions = build(tmp)
        atomic_write_bytes(tmp / _MARKER, dump_json({"recipe": recipe_json, "versions": versions}).encode())
        if final.exists():  # stale or different recipe: move aside, then swap
            trash = Path(tempfile.mkdtemp(prefix=f".tmp-old-{name}-", dir=root))
            final.rename(trash / name)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _clean_stale_temps(root)
    return versions


def _read_marker(part: Path) -> dict[str, Any] | None:
    try:
        return json.loads((part / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _clean_stale_temps(root: Path) -> None:
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


class _Steps:
    """Progress over the preparation steps: a rich bar when asked for, log lines always."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.bar, self.task = enabled, total, None, None
        self.name, self.t0 = "", 0.0

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.bar = Progress(  # on stderr: stdout may carry `--json -`
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
            self.task = self.bar.add_task("ARM64 emulation", total=self.total)
        return self

    def start(self, name: str) -> None:
        self.name, self.t0 = name, time.perf_counter()
        log.info("ARM64 emulation: preparing %s", name)
        if self.bar is not None:
            self.bar.update(self.task, description=f"ARM64 emulation: {name}")

    def done(self) -> None:
        log.info("ARM64 emulation: %s ready (%.1f s)", self.name, time.perf_counter() - self.t0)
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description="ARM64 emulation: ready" if exc[0] is None else "failed")
            self.bar.stop()


# ----------------------------------------------------------------------------- apt (private config)


@dataclasses.dataclass(frozen=True)
class _Mirrors:
    debian: str
    security: str | None

    @classmethod
    def resolve(cls, debian: str | None, security: str | None) -> _Mirrors:
        debian = debian or os.environ.get("SLIMSHIP_DEBIAN_MIRROR")
        security = security or os.environ.get("SLIMSHIP_DEBIAN_SECURITY_MIRROR")
        if debian is None:
            found = _system_debian_mirrors()
            debian = found.get("debian")
            security = security or found.get("security")
        if not debian:
            raise TargetError(
                "no Debian mirror found in /etc/apt/sources.list(.d): set SLIMSHIP_DEBIAN_MIRROR to a "
                "Debian archive URL (and optionally SLIMSHIP_DEBIAN_SECURITY_MIRROR)"
            )
        return cls(debian.rstrip("/"), security.rstrip("/") if security else None)


def _system_debian_mirrors() -> dict[str, str]:
    """The first Debian archive and security URIs of the system's apt sources (read only)."""
    entries: list[tuple[str, list[str]]] = []
    etc = Path("/etc/apt")
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for block in re.split(r"\n\s*\n", _read_text(path)):
            fields = dict(_deb822_fields(block))
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    entries.append((uri, fields.get("Suites", "").split()))
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        for line in _read_text(path).splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                entries.append((words[1], [words[2]]))
    if "ID=debian" not in _read_text(Path("/etc/os-release")).split():
        return {}  # another distribution's archive does not hold bookworm: SLIMSHIP_DEBIAN_MIRROR must say
    found: dict[str, str] = {}
    for uri, suites in entries:  # a Debian mirror serves every suite, so the host's own release is fine
        if uri.startswith(("http://", "https://", "file:")) and suites:
            found.setdefault("security" if any(s.endswith("-security") for s in suites) else "debian", uri)
    return found


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _deb822_fields(block: str) -> Iterator[tuple[str, str]]:
    for line in block.splitlines():
        if line and not line.startswith(("#", " ", "\t")) and ":" in line:
            key, value = line.split(":", 1)
            yield key.strip(), value.strip()


class _PrivateApt:
    """apt-get with its own sources, state and cache under `work`; the system's apt setup is untouched."""

    def __init__(self, work: Path, arch: str, lines: list[str]) -> None:
        self.work, self.lines = work, lines
        for sub in ("state/lists/partial", "cache/archives/partial", "etc"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        (work / "state" / "status").write_text("")
        (work / "etc" / "sources.list").write_text("\n".join(lines) + "\n")
        self.options = [
            f"APT::Architecture={arch}",
            f"APT::Architectures::={arch}",
            f"Dir::Etc::sourcelist={work / 'etc' / 'sources.list'}",
            f"Dir::Etc::sourceparts={work / 'etc' / 'sources.list.d'}",
            f"Dir::State={work / 'state'}",
            f"Dir::State::status={work / 'state' / 'status'}",
            f"Dir::Cache={work / 'cache'}",
            "Debug::NoLocking=1",
            "Acquire::Retries=1",
            "Acquire::http::Timeout=30",
            "APT::Install-Recommends=false",
        ]
        if os.geteuid() == 0:  # files land in our own dirs, which the _apt sandbox user cannot write
            self.options.append("APT::Sandbox::User=root")

    @staticmethod
    def source_lines(uri: str, suites: Sequence[str], arch: str) -> list[str]:
        return [f"deb [arch={arch} signed-by={DEBIAN_KEYRING}] {uri} {suite} main" for suite in suites]

    def run(self, args: list[str], what: str, cwd: Path | None = None) -> str:
        argv = ["apt-get", "-q", *(x for o in self.options for x in ("-o", o)), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
        if proc.returncode != 0:
            raise TargetError(
                f"could not {what} from the Debian archive (apt-get {args[0]}; sources: "
                f"{'; '.join(self.lines)}): {process_tail(proc, errors_first=True)}. Check that this Debian "
                "mirror is reachable (it comes from the system's apt sources unless SLIMSHIP_DEBIAN_MIRROR "
                "or debian_mirror= names another), then run prepare_arm64 again."
            )
        return proc.stdout

    def update(self) -> None:
        self.run(["update", "--error-on=any"], "download package lists")


def _build_qemu(out: Path, mirrors: _Mirrors) -> dict[str, str]:
    apt = _PrivateApt(out / "apt", "amd64", _PrivateApt.source_lines(mirrors.debian, [QEMU_SUITE], "amd64"))
    apt.update()
    debs = out / "debs"
    debs.mkdir()
    apt.run(["download", f"{QEMU_PACKAGE}/{QEMU_SUITE}"], f"download {QEMU_PACKAGE} ({QEMU_SUITE})", cwd=debs)
    unpacked = out / "unpacked"
    for deb in sorted(debs.glob("*.deb")):
        _dpkg_extract(deb, unpacked)
    binary = out / "qemu-aarch64"
    shutil.copy2(unpacked / "usr" / "bin" / "qemu-aarch64", binary)
    for leftover in ("apt", "debs", "unpacked"):
        shutil.rmtree(out / leftover)
    version = _qemu_version(binary)
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major < 8:
        raise TargetError(f"{QEMU_PACKAGE} {version} from {QEMU_SUITE} is too old: qemu-user >= 8 is needed")
    return {"qemu": version}


def _qemu_version(binary: Path) -> str:
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"version (\S+)", proc.stdout)
    if proc.returncode != 0 or not match:
        raise TargetError(f"{binary} does not run on this host: {process_tail(proc)}")
    return match.group(1)


def _build_sysroot(out: Path, mirrors: _Mirrors, qemu: Path) -> dict[str, str]:
    lines = _PrivateApt.source_lines(mirrors.debian, [DEBIAN_SUITE, f"{DEBIAN_SUITE}-updates"], "arm64")
    if mirrors.security:
        lines += _PrivateApt.source_lines(mirrors.security, [f"{DEBIAN_SUITE}-security"], "arm64")
    work = Path(tempfile.mkdtemp(prefix=".tmp-apt-", dir=out.parent))
    try:
        apt = _PrivateApt(work, "arm64", lines)
        apt.update()
        apt.run(
            ["install", "-y", "--download-only", *SYSROOT_PACKAGES], "download the arm64 python3.11 packages"
        )
        debs = sorted((work / "cache" / "archives").glob("*.deb"))
        if not debs:
            raise TargetError("apt-get downloaded no arm64 packages for the sysroot; check the Debian mirror")
        for deb in debs:
            _dpkg_extract(deb, out)
        versions = {"debian": DEBIAN_SUITE, "python": _deb_version(debs, "python3.11")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _precompile(out / "usr" / "lib" / "python3.11", qemu, out)
    proc = emulate(qemu, out, None, ["-c", "import platform, ssl, ctypes; print(platform.machine())"], 300)
    if proc.returncode != 0 or proc.stdout.strip() != "aarch64":
        raise TargetError(
            f"the arm64 python3.11 sysroot does not start under {qemu.name}: {process_tail(proc)}"
        )
    return versions


def _precompile(tree: Path, qemu: Path, sysroot: Path) -> None:
    """Write .pyc files for `tree` once, so the emulated python never compiles sources at import time.

    Bytecode does not depend on the CPU, only on the Python minor version: a host CPython 3.11 does it
    natively; any other host python falls back to the (slower) emulated one.
    """
    args = ["-m", "compileall", "-q", "-j", "0", str(tree)]
    if sys.version_info[:2] == (3, 11):
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    else:
        proc = emulate(qemu, sysroot, None, args, timeout=3600)
    if proc.returncode != 0:  # a few test files with deliberate syntax errors: harmless, they stay .py only
        log.debug("compileall %s reported problems: %s", tree, process_tail(proc))


def _deb_version(debs: list[Path], package: str) -> str:
    for deb in debs:
        name, _, rest = deb.name.partition("_")
        if name == package:
            return rest.split("_")[0].replace("%3a", ":")
    return "unknown"


def _dpkg_extract(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise TargetError(f"could not unpack {deb.name} with dpkg-deb: {process_tail(proc)}")


# ----------------------------------------------------------------------------- wheels (PyPI)


def _wheel_specs(runtime: str) -> list[str]:
    specs = []
    for name, constraint in RUNTIME_WHEELS[runtime]:
        if constraint is None:
            constraint = _host_pin(name)
        specs.append(name + constraint)
    return specs


def _host_pin(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"=={version(dist)}"
    except PackageNotFoundError:
        return ""


def _site_builder(root: Path, runtime: str, specs: list[str]) -> Callable[[Path], dict[str, str]]:
    def build(out: Path) -> dict[str, str]:
        wheels = out.parent / f"{out.name}-wheels"
        try:
            _pip_download(specs, wheels, runtime)
            versions = {}
            for wheel in sorted(wheels.glob("*.whl")):
                _unpack_wheel(wheel, out)
                dist, version = wheel.name.split("-")[:2]
                versions[f"{runtime}:{dist}"] = version
        finally:
            shutil.rmtree(wheels, ignore_errors=True)
        _precompile(out, root / "qemu" / "qemu-aarch64", root / "sysroot")
        _check_emulated(root, out, f"import numpy, {RUNTIME_IMPORTS[runtime]}", f"importing {runtime}")
        return versions

    return build


def _pip_download(specs: list[str], dest: Path, runtime: str) -> None:
    platforms = [x for tag in WHEEL_PLATFORMS for x in ("--platform", tag)]
    argv = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--timeout", "60", "--retries", "2", "--only-binary=:all:", *platforms, "--python-version", "3.11",
        "--implementation", "cp", "--dest", str(dest), *specs,
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TargetError(
            f"could not download the ARM64 wheels for runtime {runtime!r} ({', '.join(specs)}) from PyPI: "
            f"{process_tail(proc)}. Check that PyPI (or your pip index) is reachable and offers aarch64 "
            "wheels for CPython 3.11, then run prepare_arm64 again."
        )


def _unpack_wheel(wheel: Path, site: Path) -> None:
    """Unzip a wheel into a site dir: refuse unsafe member names; `.data/purelib|platlib` go to the root."""
    site_root = site.resolve()
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            name = member.filename
            parts = Path(name).parts
            if name.startswith("/") or ".." in parts:
                raise TargetError(f"{wheel.name}: unsafe path {name!r} in the wheel; refusing to unpack it")
            if len(parts) > 2 and parts[0].endswith(".data"):
                if parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import the runtime
                parts = parts[2:]
            target = site_root.joinpath(*parts)
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (member.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)


def _check_emulated(root: Path, site: Path | None, code: str, what: str) -> str:
    """Run `code` in the emulated python being prepared; return its stdout or raise TargetError."""
    proc = emulate(root / "qemu" / "qemu-aarch64", root / "sysroot", site, ["-c", code], timeout=300)
    if proc.returncode != 0:
        raise TargetError(f"{what} failed under ARM64 emulation: {process_tail(proc)}")
    return proc.stdout.strip()
