from __future__ import annotations

import pytest

from slimship.errors import ConfigError
from slimship.runtimes.targets import BUILTIN_TARGETS, get_target, load_targets, parse_transport


def test_builtin_profiles():
    assert {"host", "mobile-1t", "mobile-2t", "edge-int8"} <= set(BUILTIN_TARGETS)
    one = BUILTIN_TARGETS["mobile-1t"]
    assert one.threads == 1 and one.affinity == (0,)
    assert BUILTIN_TARGETS["edge-int8"].precision == "int8"
    with pytest.raises(ConfigError, match=r"known targets: .*mobile-1t"):
        get_target("nope")


def test_load_targets_yaml(tmp_path):
    kh = tmp_path / "kh"
    kh.write_text("")
    path = tmp_path / "targets.yaml"
    path.write_text(
        f"""
targets:
  pi:
    transport: ssh://pi@127.0.0.1:2222
    python: /usr/bin/python3
    threads: 4
    affinity: [0, 1, 2, 3]
    precision: int8
    runtime: tflite_runtime
    xnnpack: false
    ssh: {{key: {tmp_path}/id, known_hosts: {kh}, connect_timeout: 3}}
  phone:
    base: mobile-2t
    transport: adb://emulator-5554
    python: /data/local/tmp/python
"""
    )
    targets = load_targets(path)
    pi = targets["pi"]
    assert (pi.threads, pi.affinity, pi.precision, pi.xnnpack, pi.scheme) == (
        4,
        (0, 1, 2, 3),
        "int8",
        False,
        "ssh",
    )
    assert pi.ssh.connect_timeout == 3 and pi.ssh.known_hosts == str(kh)
    phone = targets["phone"]
    assert (phone.threads, phone.affinity, phone.scheme) == (2, (0, 1), "adb")
    assert get_target("pi", targets) is pi


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        (
            "t: {precision: int4}",
            r"targets\.t\.precision: 'int4' is not allowed; allowed values: fp32, fp16, int8",
        ),
        ("t: {runtime: tvm}", r"targets\.t\.runtime: .*allowed values: auto, onnxruntime"),
        ("t: {threds: 2}", r"targets\.t\.threds: unknown key; allowed keys: .*threads"),
        ("t: {affinity: 0}", r"targets\.t\.affinity: expected a list"),
        ("t: {threads: 0}", r"targets\.t\.threads: expected an integer >= 1"),
        (
            "t: {transport: 'ftp://x'}",
            r"targets\.t\.transport: 'ftp://x' is not a transport; allowed forms: local",
        ),
        ("t: {transport: 'ssh://u@h', python: p}", r"targets\.t\.ssh\.known_hosts: an SSH target needs"),
        ("t: {transport: 'adb://S'}", r"targets\.t\.python: a remote target needs"),
        ("t: {ssh: {key: k, port: 2}}", r"targets\.t\.ssh\.port: unknown key"),
        ("t: {base: huge}", r"targets\.t\.base: 'huge' is not a built-in target; allowed values: host"),
        # sane limits: finite, positive, within this machine's cores
        ("t: {run_timeout: .nan}", r"targets\.t\.run_timeout: expected finite seconds .*got nan"),
        ("t: {run_timeout: .inf}", r"targets\.t\.run_timeout: expected finite seconds .*got inf"),
        ("t: {ssh: {connect_timeout: 1000000000000}}", r"targets\.t\.ssh\.connect_timeout: .*<= 3600"),
        ("t: {affinity: [999]}", r"targets\.t\.affinity: \[999\] names a core this machine lacks"),
        ("t: {affinity: [1024]}", r"targets\.t\.affinity: core numbers must be distinct, from 0 to 1023"),
        ("t: {threads: 1e9}", r"targets\.t\.threads: expected an integer >= 1 and <= 1024, got '1e9'"),
        ("t: {threads: 1000000000}", r"targets\.t\.threads: expected an integer >= 1 and <= 1024"),
        ('"bad\\u0007name": {threads: 1}', r"targets: 'bad\\x07name' is not a target name"),
    ],
)
def test_invalid_targets_name_the_key(tmp_path, body, pattern):
    path = tmp_path / "t.yaml"
    path.write_text("targets:\n  " + body + "\n")
    with pytest.raises(ConfigError, match=pattern):
        load_targets(path)


def test_parse_transport():
    assert parse_transport("ssh://me@example.org") == {
        "scheme": "ssh",
        "user": "me",
        "host": "example.org",
        "port": 22,
    }
    assert parse_transport("ssh://me@127.0.0.1:2200")["port"] == 2200
    assert parse_transport("adb://R58M123") == {"scheme": "adb", "serial": "R58M123"}
    with pytest.raises(ConfigError):
        parse_transport("ssh://me@host;rm -rf /")


def test_a_description_is_shown_without_terminal_escapes(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text('targets:\n  t: {description: "\\e[2J\\e]0;owned\\u0007\\e[31mred\\u009b board"}\n')
    assert load_targets(path)["t"].description == "red board"
