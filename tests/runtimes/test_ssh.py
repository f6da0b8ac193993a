"""Remote runs over a real OpenSSH server on loopback, with the edge env (tflite-runtime 2.14, numpy<2)
as the device's python."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from slimship.errors import DeviceError, TargetError
from slimship.runtimes.edge_env import ensure_edge_python
from slimship.runtimes.execute import RUNNER_NAME
from slimship.runtimes.measure import measure, measure_speedup
from slimship.runtimes.targets import SshOptions, Target
from slimship.runtimes.torch_runner import TorchRunner
from tests.parallel import machine_lock

from .sshd import SshServer, ensure_sshd, free_port, keygen, start_sshd

pytestmark = pytest.mark.ssh


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory):
    reason = ensure_sshd()
    if reason:
        pytest.skip(reason)
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def edge_python() -> str:
    with machine_lock("edge-venv"):  # built once into ~/.cache: a parallel worker may be building it
        return str(ensure_edge_python())


def ssh_target(server: SshServer, python: str, **changes) -> Target:
    fields = dict(
        name="loopback-edge",
        transport=f"ssh://{server.user}@127.0.0.1:{server.port}",
        python=python,
        runtime="tflite_runtime",
        threads=1,
        ssh=SshOptions(key=str(server.client_key), known_hosts=str(server.known_hosts), connect_timeout=5),
        run_timeout=60,
    )
    fields.update(changes)
    return Target(**fields)


@pytest.fixture
def remote_leftovers(tmp_path_factory: pytest.TempPathFactory):
    """Remote work dirs (mktemp -d on a loopback 'device' of this test process, in its servers' own
    `remote_tmp`, so a parallel worker's runs never show here) created during the test and not removed."""
    pattern = str(tmp_path_factory.getbasetemp() / "**" / "remote-tmp" / "tmp.*" / RUNNER_NAME)
    found = lambda: {os.path.realpath(p) for p in glob.glob(pattern, recursive=True)}  # noqa: E731
    before = found()  # (realpath: pytest's *current symlinks show a folder twice)
    return lambda: sorted(found() - before)


def test_a_remote_mktemp_lands_in_the_servers_own_tmpdir(sshd_server) -> None:
    """What remote_leftovers relies on: the sessions of a test sshd make their temp dirs in its remote_tmp."""
    server = sshd_server
    argv = ["ssh", "-p", str(server.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "IdentitiesOnly=yes",
            "-i", str(server.client_key), f"{server.user}@127.0.0.1", "--", "mktemp -d"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    made = Path(done.stdout.strip())
    assert made.parent == server.remote_tmp and made.is_dir()
    made.rmdir()


def test_bench_runs_in_edge_env_over_ssh(sshd_server, edge_python, tiny_models, tmp_path, remote_leftovers):
    target = ssh_target(sshd_server, edge_python)
    ref = TorchRunner(tiny_models["dense"]["module"])
    m = measure(
        tiny_models["dense"]["tflite"],
        [tiny_models["x"]],
        target,
        warmup=2,
        runs=7,
        reference=ref,
        staging_dir=tmp_path,
    )
    assert m.runtime["backend"] == "tflite_runtime" and m.runtime["version"] == "2.14.0"
    assert m.latency.n == 7 and m.latency.p50_ms > 0
    assert m.parity is not None and m.parity.max_abs < 1e-4
    assert m.peak_rss_kb >= m.baseline_rss_kb > 0
    assert list(tmp_path.iterdir()) == [] and remote_leftovers() == []


def test_interleaved_pairs_over_ssh(sshd_server, edge_python, tiny_models):
    target = ssh_target(sshd_server, edge_python)
    sp, (dense, slim) = measure_speedup(
        tiny_models["dense"]["tflite"],
        tiny_models["slim"]["tflite"],
        [tiny_models["x"]],
        target,
        warmup=1,
        runs=9,
        flops=(4.0, 1.0),
    )
    assert sp.pairs == 9 and dense.latency.n == slim.latency.n == 9
    assert sp.p10 <= sp.median <= sp.p90
    assert sp.efficiency == pytest.approx(sp.median / 4.0)


def test_remote_without_runtime_is_a_target_error(sshd_server, tiny_models, tmp_path, remote_leftovers):
    # this venv's python has numpy but no tflite_runtime
    target = ssh_target(sshd_server, sys.executable)
    with pytest.raises(TargetError, match="no TFLite interpreter") as info:
        measure(tiny_models["dense"]["tflite"], [tiny_models["x"]], target, runs=2, staging_dir=tmp_path)
    assert type(info.value) is TargetError
    assert list(tmp_path.iterdir()) == [] and remote_leftovers() == []


def test_missing_remote_python_is_a_target_error(sshd_server, tiny_models, tmp_path):
    target = ssh_target(sshd_server, "/nonexistent/python3")
    with pytest.raises(TargetError, match="not found"):
        measure(tiny_models["dense"]["tflite"], [tiny_models["x"]], target, runs=2, staging_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_nothing_listening_is_a_device_error(sshd_server, edge_python, tiny_models, tmp_path):
    target = ssh_target(
        sshd_server, edge_python, transport=f"ssh://{sshd_server.user}@127.0.0.1:{free_port()}"
    )
    with pytest.raises(DeviceError, match="SSH connection failed"):
        measure(tiny_models["dense"]["tflite"], [tiny_models["x"]], target, runs=2, staging_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wrong_host_key_is_refused(sshd_server, edge_python, tiny_models, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd_server.port} {Path(f'{other}.pub').read_text()}")
    ssh = SshOptions(key=str(sshd_server.client_key), known_hosts=str(known), connect_timeout=5)
    staging = tmp_path / "stage"
    with pytest.raises(DeviceError, match="host key"):
        measure(
            tiny_models["dense"]["tflite"],
            [tiny_models["x"]],
            ssh_target(sshd_server, edge_python, ssh=ssh),
            runs=2,
            staging_dir=staging,
        )
    assert list(staging.iterdir()) == []


def test_run_timeout_stops_the_remote_run(sshd_server, edge_python, tiny_models, tmp_path):
    target = ssh_target(sshd_server, edge_python, run_timeout=2)
    with pytest.raises(DeviceError, match="run_timeout"):
        measure(
            tiny_models["dense"]["tflite"], [tiny_models["x"]], target, runs=10_000_000, staging_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []


def test_server_killed_mid_run_is_a_device_error(edge_python, tiny_models, tmp_path, remote_leftovers):
    server = start_sshd(tmp_path / "sshd")
    staging = tmp_path / "stage"
    killer = threading.Timer(3.0, server.stop)
    killer.start()
    try:
        with pytest.raises(DeviceError):
            measure(
                tiny_models["dense"]["tflite"],
                [tiny_models["x"]],
                ssh_target(server, edge_python),
                runs=10_000_000,
                staging_dir=staging,
            )
    finally:
        killer.cancel()
        server.stop()
        for leftover in remote_leftovers():  # the 'device' vanished before cleanup could reach it
            shutil.rmtree(Path(leftover).parent)
    assert list(staging.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense tiny Llama (zeroed groups in place) and its slim twin, exported to ONNX with their KV cache."""
    from slimship.decoder import DecoderExportOptions, export_decoder
    from tests.decoder.tiny import tiny_slim_llama, tiny_zeroed_llama

    options = DecoderExportOptions(max_seq_len=32, prompt_len=4, new_tokens=4)
    root = tmp_path_factory.mktemp("decoders")
    files = {}
    for name, model in (("dense", tiny_zeroed_llama()), ("slim", tiny_slim_llama())):
        (root / name).mkdir()
        files[name] = export_decoder(model, ["onnx"], root / name, "llama", options)["onnx"].path
    return files


def test_decode_bench_runs_in_the_device_runner_over_ssh(sshd_server, tiny_decoders, tmp_path, capsys,
                                                        remote_leftovers):  # fmt: skip
    """`bench --task text-generation --target SSH`: the greedy loop runs in the shipped device runner (this
    venv's python as the device's: numpy + onnxruntime); it generates what this host's runner does."""
    from slimship.cli import main
    from slimship.decoder.runner import greedy, open_decoder

    server = sshd_server
    targets = tmp_path / "targets.yaml"
    targets.write_text(
        f"targets:\n  loopback:\n    transport: ssh://{server.user}@127.0.0.1:{server.port}\n"
        f"    python: {sys.executable}\n    threads: 1\n    runtime: onnxruntime\n"
        f"    ssh: {{key: {server.client_key}, known_hosts: {server.known_hosts}, connect_timeout: 5}}\n"
    )
    dense, slim = tiny_decoders["dense"], tiny_decoders["slim"]
    argv = ["bench", "--task", "text-generation", str(slim), "--dense", str(dense), "--prompt-len", "5",
            "--new-tokens", "6", "--runs", "4", "--warmup", "1", "--target", "loopback",
            "--targets-file", str(targets), "--json", "-"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "loopback" and result["where"].startswith("device (ssh://")
    assert [Path(m["model"]) for m in result["measurements"]] == [dense, slim]
    prompt = result["prompt"]
    assert len(prompt) == 5
    for m in result["measurements"]:
        assert m["decode_tok_s"]["median"] > 0 and m["ttft_ms"]["median"] > 0
        assert m["tokens"] == greedy(open_decoder(m["model"]), prompt, 6, stop_at_eos=False).tokens
    (speedup,) = result["decode_speedups"]
    assert speedup["pairs"] == 4 and speedup["target"] == "loopback"
    assert remote_leftovers() == []

    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"x")
    assert main([*argv[:3], str(tflite), *argv[6:-2]]) == 2  # refused on the host, before any shipping
    assert "text generation runs .pte and .onnx" in capsys.readouterr().err
