"""Transports: how files reach a target and how commands run there.

A transport prepares a working directory on the target, copies files in (`put`), runs an argv
list (`run`), copies files back (`get`) and removes its directory (`cleanup`). Built in: `local`
(this machine, subprocess), `ssh://user@host[:port]` (system OpenSSH client) and `adb://SERIAL`.
Another module adds a scheme with `register_transport("name", factory)`; a factory takes a
`Target` and returns a Transport.

Remote shells receive a string: every remote command is built with `shlex.join` over an argv
list, never by pasting strings. SSH host keys are always checked against the target's known_hosts.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from slimship.errors import DeviceError, TargetError
from slimship.runtimes.targets import TRANSPORT_FACTORIES, Target, parse_transport, register_transport

log = logging.getLogger(__name__)
_SAFE_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/-]+$")


@dataclass(frozen=True)
class RunResult:
    """Exit status and captured text of one command run on a target."""

    returncode: int
    stdout: str
    stderr: str


@runtime_checkable
class Transport(Protocol):
    """Moves files to/from a target and runs commands there."""

    def prepare(self) -> str:
        """Create a fresh working directory on the target and return its path."""
        ...

    def put(self, local: Path, remote_name: str) -> str:
        """Copy a local file into the working directory; return its path on the target."""
        ...

    def run(self, argv: list[str], timeout: float) -> RunResult:
        """Run argv on the target; raise DeviceError on a lost connection or time-out."""
        ...

    def get(self, remote: str, local: Path) -> Path:
        """Copy a file back; `local` appears whole or not at all."""
        ...

    def cleanup(self) -> None:
        """Remove the working directory (safe to call twice)."""
        ...


def open_transport(target: Target) -> Transport:
    """The transport for a target, by its scheme."""
    parse_transport(target.transport, f"target {target.name!r}: transport")
    factory = TRANSPORT_FACTORIES.get(target.scheme)
    if factory is None:
        raise TargetError(
            f"target {target.name!r}: no transport for scheme {target.scheme!r}; "
            f"known: {', '.join(TRANSPORT_FACTORIES)}"
        )
    return factory(target)


def _tail(text: str, lines: int = 4) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _subprocess(argv: list[str], timeout: float, what: str) -> RunResult:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise DeviceError(
            f"{what}: timed out after {timeout:g} s; the device may be unreachable or overloaded"
        ) from None
    except FileNotFoundError:
        raise TargetError(f"{what}: program {argv[0]!r} is not installed on this host") from None
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


def _replace_into(tmp: Path, local: Path) -> Path:
    os.replace(tmp, local)
    return local


class LocalTransport:
    """Runs on this machine, in a temp directory, in a child process."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.workdir: str | None = None

    def prepare(self) -> str:
        self.workdir = tempfile.mkdtemp(prefix="slimship-run-")
        return self.workdir

    def put(self, local: Path, remote_name: str) -> str:
        dest = os.path.join(self._dir(), remote_name)
        shutil.copyfile(local, dest)
        return dest

    def run(self, argv: list[str], timeout: float) -> RunResult:
        return _subprocess(argv, timeout, f"target {self.target.name!r}: {Path(argv[0]).name}")

    def get(self, remote: str, local: Path) -> Path:
        if not os.path.exists(remote):
            raise DeviceError(f"target {self.target.name!r}: {remote} was not produced")
        tmp = local.with_name(f".{local.name}.part")
        shutil.copyfile(remote, tmp)
        return _replace_into(tmp, local)

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _dir(self) -> str:
        if not self.workdir:
            raise DeviceError(f"target {self.target.name!r}: prepare() was not called")
        return self.workdir


class _RemoteShellTransport:
    """Shared logic of SSH and adb: a mktemp'd directory, argv-joined commands, checked copies."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.workdir: str | None = None

    # subclasses provide these three
    def _shell_argv(self, command: str) -> list[str]:
        raise NotImplementedError

    def _put_argv(self, local: Path, remote: str) -> list[str]:
        raise NotImplementedError

    def _get_argv(self, remote: str, local: Path) -> list[str]:
        raise NotImplementedError

    def _check_connection(self, result: RunResult, what: str) -> None:
        """Raise DeviceError when `result` shows the connection itself failed."""

    @property
    def where(self) -> str:
        return f"target {self.target.name!r} ({self.target.transport})"

    def prepare(self) -> str:
        result = self._exec(["mktemp", "-d"], timeout=self._connect_budget(), what="mktemp -d")
        path = result.stdout.strip()
        if result.returncode != 0 or not _SAFE_REMOTE_DIR.match(path):
            raise DeviceError(
                f"{self.where}: could not create a remote temp dir: {_tail(result.stderr + path)}"
            )
        self.workdir = path
        return path

    def put(self, local: Path, remote_name: str) -> str:
        remote = f"{self._dir()}/{remote_name}"
        result = _subprocess(
            self._put_argv(local, remote), self._connect_budget() + 120, f"{self.where}: copy"
        )
        self._check_connection(result, f"copy {local.name}")
        if result.returncode != 0:
            raise DeviceError(f"{self.where}: could not copy {local} to {remote}: {_tail(result.stderr)}")
        return remote

    def run(self, argv: list[str], timeout: float) -> RunResult:
        # `timeout` on the device too, so a lost connection does not leave the model running there
        bounded = ["timeout", str(max(1, int(timeout))), *argv]
        return self._exec(bounded, timeout=timeout + self._connect_budget(), what=Path(argv[0]).name)

    def get(self, remote: str, local: Path) -> Path:
        tmp = local.with_name(f".{local.name}.part")
        try:
            result = _subprocess(
                self._get_argv(remote, tmp), self._connect_budget() + 120, f"{self.where}: fetch"
            )
            self._check_connection(result, f"fetch {remote}")
            if result.returncode != 0 or not tmp.exists():
                raise DeviceError(f"{self.where}: could not fetch {remote}: {_tail(result.stderr)}")
            return _replace_into(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)

    def cleanup(self) -> None:
        if not self.workdir:
            return
        workdir, self.workdir = self.workdir, None
        try:
            self._exec(["rm", "-rf", "--", workdir], timeout=self._connect_budget() + 30, what="rm -rf")
        except DeviceError as exc:  # the device is gone: nothing more we can do there
            log.warning("%s: could not remove %s: %s", self.where, workdir, exc)

    def _exec(self, argv: list[str], timeout: float, what: str) -> RunResult:
        result = _subprocess(self._shell_argv(shlex.join(argv)), timeout, f"{self.where}: {what}")
        self._check_connection(result, what)
        return result

    def _connect_budget(self) -> float:
        return float(self.target.ssh.connect_timeout) + 5.0

    def _dir(self) -> str:
        if not self.workdir:
            raise DeviceError(f"{self.where}: prepare() was not called")
        return self.workdir


class SshTransport(_RemoteShellTransport):
    """`ssh://user@host[:port]` through the system OpenSSH client (ssh + scp), host keys checked."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        parts = parse_transport(target.transport, f"target {target.name!r}: transport")
        self.user, self.host, self.port = parts["user"], parts["host"], parts["port"]
        if not target.ssh.known_hosts:
            raise TargetError(
                f"target {target.name!r}: ssh.known_hosts is required (host keys are always checked)"
            )
        if not Path(target.ssh.known_hosts).is_file():
            raise TargetError(
                f"target {target.name!r}: ssh.known_hosts file {target.ssh.known_hosts} does not exist"
            )

    def _options(self) -> list[str]:
        opts = [
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.target.ssh.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", f"ConnectTimeout={self.target.ssh.connect_timeout}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        if self.target.ssh.key:
            opts += ["-o", "IdentitiesOnly=yes", "-i", self.target.ssh.key]
        return opts

    @property
    def _dest(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}"

    def _shell_argv(self, command: str) -> list[str]:
        return ["ssh", "-p", str(self.port), *self._options(), f"{self.user}@{self.host}", "--", command]

    def _put_argv(self, local: Path, remote: str) -> list[str]:
        return [
            "scp",
            "-q",
            "-P",
            str(self.port),
            *self._options(),
            "--",
            str(local),
            f"{self._dest}:{remote}",
        ]

    def _get_argv(self, remote: str, local: Path) -> list[str]:
        return [
            "scp",
            "-q",
            "-P",
            str(self.port),
            *self._options(),
            "--",
            f"{self._dest}:{remote}",
            str(local),
        ]

    def _check_connection(self, result: RunResult, what: str) -> None:
        if "Host key verification failed" in result.stderr or "REMOTE HOST IDENTIFICATION" in result.stderr:
            raise DeviceError(
                f"{self.where}: {what}: the host key of {self.host}:{self.port} is not the one in "
                f"{self.target.ssh.known_hosts};"
                " refusing to connect. Verify the device, then update known_hosts."
            )
        if result.returncode == 255:
            raise DeviceError(
                f"{self.where}: {what}: SSH connection failed or was lost: {_tail(result.stderr)}. "
                "Check that the device is up, the port is right and the key is authorised."
            )


class AdbTransport(_RemoteShellTransport):
    """`adb://SERIAL`: `adb -s SERIAL push/shell/pull`."""

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.serial = parse_transport(target.transport, f"target {target.name!r}: transport")["serial"]

    def _shell_argv(self, command: str) -> list[str]:
        return ["adb", "-s", self.serial, "shell", command]

    def _put_argv(self, local: Path, remote: str) -> list[str]:
        return ["adb", "-s", self.serial, "push", str(local), remote]

    def _get_argv(self, remote: str, local: Path) -> list[str]:
        return ["adb", "-s", self.serial, "pull", remote, str(local)]

    def _check_connection(self, result: RunResult, what: str) -> None:
        text = result.stderr.lower()
        if "device" in text and ("not found" in text or "offline" in text or "unauthorized" in text):
            raise DeviceError(
                f"{self.where}: {what}: adb device {self.serial} is not available: {_tail(result.stderr)}"
            )


register_transport("local", LocalTransport)
register_transport("ssh", SshTransport)
register_transport("adb", AdbTransport)


def host_python() -> str:
    """The python that runs local targets by default."""
    return sys.executable
