"""A throwaway OpenSSH server on loopback for the ssh tests (real sshd, own config and keys)."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.parallel import free_port, machine_lock

SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def ensure_sshd() -> str | None:
    """Path of sshd, installing Debian's openssh-server as root if needed; None with a reason otherwise."""
    if os.path.exists(SSHD):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "sshd is missing and installing openssh-server needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with machine_lock("apt"):  # one dpkg at a time: a parallel worker may be installing too
        if os.path.exists(SSHD):
            return None
        install = ["apt-get", "install", "-y", "-q", "openssh-server"]
        proc = subprocess.run(install, capture_output=True, env=env)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            proc = subprocess.run(install, capture_output=True, env=env)
    return None if os.path.exists(SSHD) else f"apt-get install openssh-server failed: {proc.stderr[-300:]!r}"


@dataclass
class SshServer:
    root: Path
    port: int
    user: str
    client_key: Path
    known_hosts: Path
    proc: subprocess.Popen

    @property
    def remote_tmp(self) -> Path:
        """The sessions' $TMPDIR: where a remote `mktemp -d` lands (this server's own, not /tmp)."""
        return self.root / "remote-tmp"

    def stop(self) -> None:
        """Stop sshd and every session process it forked (all started by this test)."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        for p in [*children]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def start_sshd(root: Path) -> SshServer:
    root.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation dir that Debian's sshd requires
    host_key, client_key = keygen(root / "host_ed25519"), keygen(root / "client_ed25519")
    (root / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    (root / "remote-tmp").mkdir(exist_ok=True)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "Subsystem sftp internal-sftp",
            f"SetEnv TMPDIR={root / 'remote-tmp'}",  # a parallel worker's runs stay out of this one's
            "LogLevel ERROR",
            "",
        ])
    )  # fmt: skip
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    with open(root / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited: {(root / 'sshd.log').read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    return SshServer(root, port, getpass.getuser(), client_key, known_hosts, proc)
