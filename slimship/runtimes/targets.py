"""Target profiles: where and how a model runs, as plain data.

A `Target` says which runtime runs which model variant, with how many threads, pinned to which
cores, with or without the XNNPACK delegate, and through which transport (this machine, an SSH
host, an adb device). Built-in profiles live in `BUILTIN_TARGETS`; users add their own in YAML:

    targets:
      pi4:
        transport: ssh://pi@10.0.0.7:22
        python: /usr/bin/python3
        threads: 4
        precision: int8
        runtime: tflite_runtime
        ssh: {key: ~/.ssh/id_ed25519, known_hosts: ~/.ssh/known_hosts, connect_timeout: 10}
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimship._console import printable
from slimship._yaml import load_yaml
from slimship.errors import ConfigError, TransportError
from slimship.runtimes.arm64_provision import (
    RUNTIMES as EMULATED_RUNTIMES,  # ExecuTorch is not provisioned there
)
from slimship.runtimes.registry import RUNTIME_NAMES

PRECISIONS = ("fp32", "fp16", "int8")
RUNTIME_CHOICES = ("auto", *RUNTIME_NAMES)
TRANSPORT_SCHEMES = ("local", "ssh://user@host[:port]", "adb://SERIAL")
_BUILTIN_SCHEMES = ("local", "ssh", "adb")
_SSH_RE = re.compile(r"^ssh://(?P<user>[^@]*)@(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>[^:]*))?$")
# Each part of ssh://user@host[:port]: (pattern it must match, what to tell the user). Nothing may start
# with '-' (ssh and scp would read it as an option), and whitespace, control characters and '@' never pass.
_SSH_PARTS = {
    "user": (
        re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*"),
        "letters, digits, '.', '_' and '-', not starting with '-'",
    ),
    "host": (
        re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*"),
        "a host name or IPv4 address (letters, digits, '.', '_', '-', not starting with '-'), "
        "or an IPv6 address in brackets",
    ),
    "port": (re.compile(r"[0-9]{1,5}"), "a number from 1 to 65535"),
}
_ADB_RE = re.compile(r"^adb://(?P<serial>[A-Za-z0-9._:][A-Za-z0-9._:-]*)$")


@dataclass(frozen=True)
class SshOptions:
    """How to reach an SSH target. Host keys are always checked against `known_hosts`."""

    key: str | None = None
    known_hosts: str | None = None
    connect_timeout: int = 10


@dataclass(frozen=True)
class Target:
    """One place to run models, with its runtime settings."""

    name: str
    threads: int | None = None
    affinity: tuple[int, ...] = ()
    xnnpack: bool = True
    precision: str = "fp32"
    runtime: str = "auto"
    transport: str = "local"
    emulated: bool = False
    python: str | None = None  # interpreter on the device; None: this process's python (local only)
    ssh: SshOptions = field(default_factory=SshOptions)
    run_timeout: float = 600.0
    description: str = ""

    @property
    def scheme(self) -> str:
        """'local', 'ssh', 'adb' or another registered transport scheme."""
        return self.transport.split("://", 1)[0] if "://" in self.transport else self.transport

    def with_overrides(self, **changes: Any) -> Target:
        return dataclasses.replace(self, **changes)


BUILTIN_TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("host", description="this machine, runtime defaults"),
        Target("mobile-1t", threads=1, affinity=(0,), description="one thread pinned to core 0"),
        Target("mobile-2t", threads=2, affinity=(0, 1), description="two threads pinned to cores 0-1"),
        Target(
            "edge-int8",
            threads=1,
            affinity=(0,),
            precision="int8",
            runtime="litert",
            description="full-int8 TFLite, one thread",
        ),
        *(
            Target(
                f"arm64-emu-{runtime.replace('_', '-')}",
                threads=1,
                runtime=runtime,
                transport="qemu-aarch64://local",
                emulated=True,
                run_timeout=1800.0,
                description=f"ARM64 {runtime} under qemu user-mode emulation (not device timings)",
            )
            for runtime in EMULATED_RUNTIMES
        ),
    )
}


def get_target(name: str, extra: dict[str, Target] | None = None) -> Target:
    """Look a target up among `extra` (user targets) and the built-ins."""
    table = {**BUILTIN_TARGETS, **(extra or {})}
    if name not in table:
        raise ConfigError(f"unknown target {name!r}; known targets: {', '.join(sorted(table))}")
    return table[name]


#: scheme -> factory(target) -> a Transport (`slimship.runtimes.transports`); filled by the modules that
#: implement transports (local, ssh, adb there; qemu-aarch64 in arm64_emu), read here to accept their specs.
TRANSPORT_FACTORIES: dict[str, Callable[[Any], Any]] = {}


def register_transport(scheme: str, factory: Callable[[Any], Any]) -> None:
    """Make `scheme://...` (or bare `scheme`) targets use `factory(target)`."""
    TRANSPORT_FACTORIES[scheme] = factory


def parse_transport(spec: str, where: str = "transport") -> dict[str, Any]:
    """Split a transport string into its parts; raise TransportError naming `where` if invalid."""
    if spec == "local":
        return {"scheme": "local"}
    if spec.startswith("ssh://") and (m := _SSH_RE.match(spec)):
        parts = {k: v for k, v in m.groupdict().items() if v is not None}
        for key, value in parts.items():
            pattern, allowed = _SSH_PARTS[key]
            if not pattern.fullmatch(value) or (key == "port" and not 1 <= int(value) <= 65535):
                raise TransportError(
                    f"{where}: the SSH {key} {value!r} in {spec!r} is not allowed; use {allowed}"
                )
        return {
            "scheme": "ssh",
            "user": parts["user"],
            "host": parts["host"].strip("[]"),
            "port": int(parts.get("port", 22)),
        }
    if m := _ADB_RE.match(spec):
        return {"scheme": "adb", "serial": m["serial"]}
    scheme = spec.split("://", 1)[0]
    if "://" in spec and scheme in tuple(TRANSPORT_FACTORIES) and scheme not in _BUILTIN_SCHEMES:
        return {"scheme": scheme, "rest": spec.split("://", 1)[1]}
    raise TransportError(
        f"{where}: {spec!r} is not a transport; allowed forms: {', '.join(TRANSPORT_SCHEMES)}"
        + "".join(f", {s}://..." for s in tuple(TRANSPORT_FACTORIES) if s not in _BUILTIN_SCHEMES)
    )


# --- YAML validation: one checker per key -------------------------------------------------------


MAX_THREADS = 1024
_TARGET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,99}")
_NAME_RULE = "letters, digits and . _ @ + -, at most 100 characters"
MAX_CORE = 1023  # a remote device's core numbers; a local target's must exist on this machine
MAX_CONNECT_TIMEOUT = 3600
MAX_RUN_TIMEOUT = 7 * 86400.0


def _int_or_none(value: Any, where: str, minimum: int = 1, maximum: int = MAX_THREADS) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{where}: expected an integer >= {minimum} and <= {maximum}, got {value!r}")
    return value


def _choice(allowed: tuple[str, ...]):
    def check(value: Any, where: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed values: {', '.join(allowed)}")
        return value

    return check


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _affinity(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise ConfigError(f"{where}: expected a list of CPU core numbers such as [0, 1], got {value!r}")
    if any(not 0 <= c <= MAX_CORE for c in value) or len(set(value)) != len(value):
        raise ConfigError(f"{where}: core numbers must be distinct, from 0 to {MAX_CORE}, got {value!r}")
    return tuple(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a non-empty string, got {value!r}")
    return value


def _transport(value: Any, where: str) -> str:
    parse_transport(_str(value, where), where)
    return value


def _timeout(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_RUN_TIMEOUT:
        raise ConfigError(f"{where}: expected finite seconds from 0 to {MAX_RUN_TIMEOUT:.0f}, got {value!r}")
    return float(value)


def _description(value: Any, where: str) -> str:
    """Free text shown in tables: control characters and terminal escape sequences removed."""
    return printable(str(value))


def _ssh(value: Any, where: str) -> SshOptions:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping with keys key, known_hosts, connect_timeout")
    checks = {"key": _str, "known_hosts": _str,
              "connect_timeout": lambda v, w: _int_or_none(v, w, maximum=MAX_CONNECT_TIMEOUT)}  # fmt: skip
    _unknown_keys(value, checks, where)
    kwargs = {k: checks[k](v, f"{where}.{k}") for k, v in value.items()}
    for k in ("key", "known_hosts"):
        if k in kwargs:
            kwargs[k] = str(Path(kwargs[k]).expanduser())
    return SshOptions(**kwargs)


_FIELD_CHECKS = {
    "threads": lambda v, w: _int_or_none(v, w),
    "affinity": _affinity,
    "xnnpack": _bool,
    "precision": _choice(PRECISIONS),
    "runtime": _choice(RUNTIME_CHOICES),
    "transport": _transport,
    "emulated": _bool,
    "python": _str,
    "ssh": _ssh,
    "run_timeout": _timeout,
    "description": _description,
    "base": _str,
}


def _unknown_keys(mapping: dict[str, Any], allowed: dict[str, Any], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown key; allowed keys: {', '.join(sorted(allowed))}")


def target_from_dict(name: str, data: dict[str, Any], where: str = "targets") -> Target:
    """Validate one target mapping. `base: NAME` starts from a built-in profile."""
    where = f"{where}.{name}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of target settings, got {type(data).__name__}")
    _unknown_keys(data, _FIELD_CHECKS, where)
    values = {k: _FIELD_CHECKS[k](v, f"{where}.{k}") for k, v in data.items()}
    base_name = values.pop("base", None)
    if base_name is not None and base_name not in BUILTIN_TARGETS:
        raise ConfigError(
            f"{where}.base: {base_name!r} is not a built-in target; "
            f"allowed values: {', '.join(BUILTIN_TARGETS)}"
        )
    base = BUILTIN_TARGETS[base_name] if base_name else Target(name)
    target = dataclasses.replace(base, name=name, **values)
    if target.scheme != "local" and target.python is None:
        raise ConfigError(
            f"{where}.python: a remote target needs the path of its python, e.g. /usr/bin/python3"
        )
    cores = os.cpu_count() or 1
    if target.scheme == "local" and any(c >= cores for c in target.affinity):
        raise ConfigError(
            f"{where}.affinity: {list(target.affinity)} names a core this machine lacks (cores 0-{cores - 1})"
        )
    if target.scheme == "ssh" and not target.ssh.known_hosts:
        raise ConfigError(
            f"{where}.ssh.known_hosts: an SSH target needs a known_hosts file (host keys are always checked)"
        )
    return target


def load_targets(path: str | Path) -> dict[str, Target]:
    """Read user targets from a YAML file with a top-level `targets:` mapping."""
    path = Path(path)
    data = load_yaml(path, "targets file")  # bounded: size, alias expansion, plain tags only
    if not isinstance(data, dict) or not isinstance(data.get("targets"), dict):
        raise ConfigError(f"{path}: expected a top-level mapping `targets:` of name -> settings")
    _unknown_keys(data, {"targets": None}, str(path))
    for name in data["targets"]:
        if not isinstance(name, str) or not _TARGET_NAME.fullmatch(name):
            raise ConfigError(f"{path}: targets: {str(name)[:80]!r} is not a target name: {_NAME_RULE}")
    return {
        str(name): target_from_dict(str(name), spec, f"{path}: targets")
        for name, spec in data["targets"].items()
    }
