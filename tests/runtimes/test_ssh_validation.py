"""SSH transports: a user, host or port that ssh/scp could read as an option or misparse is refused."""

from __future__ import annotations

import pytest

from slimship.errors import ConfigError, TargetError, TransportError
from slimship.runtimes.targets import SshOptions, Target, load_targets, parse_transport
from slimship.runtimes.transports import SshTransport, open_transport

BAD_SSH = {
    "user-is-an-option": ("ssh://-oProxyCommand=touch /tmp/pwned@host", "user"),
    "user-option-no-space": ("ssh://-oProxyCommand=id@host", "user"),
    "host-is-an-option": ("ssh://pi@-oProxyCommand=id", "host"),
    "host-dash": ("ssh://pi@-host:22", "host"),
    "user-with-space": ("ssh://p i@host", "user"),
    "user-with-tab": ("ssh://pi\t@host", "user"),
    "host-with-newline": ("ssh://pi@host\nid", "host"),
    "host-with-control": ("ssh://pi@ho\x01st", "host"),
    "user-with-at": ("ssh://a@b@host", "host"),
    "empty-user": ("ssh://@host", "user"),
    "empty-host": ("ssh://pi@", "host"),
    "port-zero": ("ssh://pi@host:0", "port"),
    "port-too-big": ("ssh://pi@host:65536", "port"),
    "port-not-a-number": ("ssh://pi@host:ssh", "port"),
    "port-negative": ("ssh://pi@host:-1", "port"),
    "port-empty": ("ssh://pi@host:", "port"),
    "shell-in-host": ("ssh://me@host;rm -rf /", "host"),
}


@pytest.mark.parametrize(("spec", "part"), BAD_SSH.values(), ids=BAD_SSH)
def test_bad_ssh_parts_are_refused_by_name(spec: str, part: str) -> None:
    with pytest.raises(TransportError, match=rf"^transport: the SSH {part} .* is not allowed; use ") as info:
        parse_transport(spec)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TargetError)


@pytest.mark.parametrize(
    ("spec", "user", "host", "port"),
    [
        ("ssh://pi@10.0.0.7:22", "pi", "10.0.0.7", 22),
        ("ssh://ci-bot.2@device-3.lab", "ci-bot.2", "device-3.lab", 22),
        ("ssh://_svc@[fe80::1]:2222", "_svc", "fe80::1", 2222),
        ("ssh://u@h:65535", "u", "h", 65535),
    ],
)
def test_good_ssh_transports_parse(spec: str, user: str, host: str, port: int) -> None:
    assert parse_transport(spec) == {"scheme": "ssh", "user": user, "host": host, "port": port}


def test_a_targets_file_names_the_target_key(tmp_path) -> None:
    path = tmp_path / "targets.yaml"
    path.write_text(
        "targets:\n  pi:\n    transport: 'ssh://-oProxyCommand=id@host'\n    python: /usr/bin/python3\n"
        "    ssh: {known_hosts: kh}\n"
    )
    with pytest.raises(ConfigError, match=r"targets\.pi\.transport: the SSH user '-oProxyCommand=id'"):
        load_targets(path)


@pytest.mark.parametrize("spec", ["ssh://-oProxyCommand=id@host", "ssh://pi@-oX", "ssh://pi@host:99999"])
def test_a_target_built_in_python_is_refused_with_a_target_error(spec: str, tmp_path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    target = Target(
        "lab-pi", transport=spec, python="/usr/bin/python3", ssh=SshOptions(known_hosts=str(known))
    )
    for opener in (open_transport, SshTransport):
        with pytest.raises(TargetError, match=r"^target 'lab-pi': transport: the SSH "):
            opener(target)


def test_an_adb_serial_may_not_start_with_a_dash() -> None:
    with pytest.raises(ConfigError, match="is not a transport"):
        parse_transport("adb://-s")
    assert parse_transport("adb://emulator-5554") == {"scheme": "adb", "serial": "emulator-5554"}
