from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from slimship._util import dump_json
from slimship.errors import ConfigError, ModelFileError, TargetError
from slimship.runtimes import device_runner
from slimship.runtimes.measure import bench, format_bench_table, measure, parity, speedup_from_ratios
from slimship.runtimes.runners import OnnxRuntimeRunner, Runner, runner_for
from slimship.runtimes.targets import BUILTIN_TARGETS, Target
from slimship.runtimes.torch_runner import TorchRunner
from slimship.runtimes.transports import open_transport, register_transport


def run_cli(tmp_path, *args):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, device_runner.__file__, *map(str, args), "--out", str(out)], check=False
    )
    return proc.returncode, json.loads(out.read_text())


@pytest.fixture
def inputs_npz(tmp_path, tiny_models):
    path = tmp_path / "inputs.npz"
    np.savez(path, in0=tiny_models["x"])
    return path


def test_device_runner_cli_single_model_contract(tmp_path, tiny_models, inputs_npz):
    outs = tmp_path / "outputs.npz"
    code, result = run_cli(
        tmp_path,
        "--model",
        tiny_models["dense"]["onnx"],
        "--inputs",
        inputs_npz,
        "--runs",
        4,
        "--warmup",
        1,
        "--save-outputs",
        outs,
    )
    assert code == 0 and result["ok"] and result["model"] == "model.onnx"
    assert (
        len(result["latencies_ms"]) == 4
        and result["load_ms"] > 0
        and result["runtime"]["backend"] == "onnxruntime"
    )
    assert result["peak_rss_kb"] >= result["baseline_rss_kb"] > 0
    expected = TorchRunner(tiny_models["dense"]["module"]).run([tiny_models["x"]])[0]
    with np.load(outs) as data:
        np.testing.assert_allclose(data["out0"], expected, atol=1e-5)


def test_device_runner_pair_mode_affinity_and_xnnpack_off(tmp_path, tiny_models, inputs_npz):
    outs = tmp_path / "outputs.npz"
    code, result = run_cli(
        tmp_path,
        "--model",
        tiny_models["dense"]["tflite"],
        "--model",
        tiny_models["slim"]["tflite"],
        "--inputs",
        inputs_npz,
        "--runs",
        5,
        "--affinity",
        "0",
        "--xnnpack",
        "off",
        "--threads",
        1,
        "--save-outputs",
        outs,
    )
    assert code == 0, result
    assert result["affinity"] == [0]
    assert [len(m["latencies_ms"]) for m in result["models"]] == [5, 5]
    assert all(m["runtime"]["xnnpack"] is False for m in result["models"])
    ratios = result["pair_ratios"][0]
    lat = [m["latencies_ms"] for m in result["models"]]
    assert ratios == pytest.approx([a / b for a, b in zip(*lat)])
    with np.load(outs) as data:
        for key, name in (("out0", "dense"), ("m1_out0", "slim")):
            ref = TorchRunner(tiny_models[name]["module"]).run([tiny_models["x"]])[0]
            np.testing.assert_allclose(data[key], ref, atol=1e-4)


def test_device_runner_reports_errors_as_json(tmp_path, inputs_npz):
    code, result = run_cli(tmp_path, "--model", tmp_path / "missing.tflite", "--inputs", inputs_npz)
    assert code == 1 and result["ok"] is False and result["error"].startswith("RunnerLoadError")
    assert not list(tmp_path.glob("*.tmp"))


def test_runners_protocol_and_parity(tiny_models):
    x = [tiny_models["x"]]
    ref = TorchRunner(tiny_models["dense"]["module"])
    for runner in (
        runner_for(tiny_models["dense"]["onnx"]),
        runner_for(tiny_models["dense"]["tflite"], threads=1),
        ref,
    ):
        assert isinstance(runner, Runner)
        assert parity(runner.run(x), ref.run(x)).max_abs < 1e-4
    with pytest.raises(TargetError, match="call load"):
        OnnxRuntimeRunner().run(x)
    with pytest.raises(ModelFileError):
        runner_for("model.bin")


def test_measure_accuracy_agreement_and_parity(tiny_models):
    rng = np.random.default_rng(1)
    batches_x = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(6)]
    ref = TorchRunner(tiny_models["dense"]["module"])
    ref_top1 = [int(ref.run([b])[0].argmax()) for b in batches_x]
    labels = [np.array([t if i < 3 else (t + 1) % 5]) for i, t in enumerate(ref_top1)]  # half right
    m = measure(
        tiny_models["dense"]["onnx"],
        [tiny_models["x"]],
        BUILTIN_TARGETS["mobile-1t"],
        warmup=1,
        runs=5,
        eval_batches=list(zip(batches_x, labels)),
        reference=ref,
    )
    assert m.accuracy == pytest.approx(0.5) and m.agreement == 1.0 and m.eval_samples == 6
    assert m.parity.max_abs < 1e-4 and m.affinity == [0] and m.latency.n == 5
    slim = measure(
        tiny_models["slim"]["tflite"],
        [tiny_models["x"]],
        BUILTIN_TARGETS["host"],
        runs=3,
        eval_batches=list(zip(batches_x, labels)),
        reference=ref,
    )
    slim_top1 = [int(TorchRunner(tiny_models["slim"]["module"]).run([b])[0].argmax()) for b in batches_x]
    assert slim.agreement == pytest.approx(np.mean(np.array(slim_top1) == np.array(ref_top1)))


def test_bench_speedup_and_table(tiny_models):
    dense, slim = tiny_models["dense"]["tflite"], tiny_models["slim"]["tflite"]
    result = bench(
        [dense, slim],
        BUILTIN_TARGETS["mobile-1t"],
        [tiny_models["x"]],
        dense=dense,
        warmup=1,
        runs=6,
        flops={str(dense): 8.0, str(slim): 2.0},
    )
    assert [m.model for m in result.measurements] == [str(dense), str(slim)]
    (sp,) = result.speedups
    assert sp.pairs == 6 and sp.flops_ratio == 4.0 and sp.efficiency == pytest.approx(sp.median / 4.0)
    table = format_bench_table(result)
    assert table.row_count == 2
    data = json.loads(dump_json(result))
    assert data["target"]["name"] == "mobile-1t" and len(data["speedups"]) == 1


def test_speedup_from_ratios():
    sp = speedup_from_ratios([1.0, 2.0, 3.0, 4.0, 5.0], "d", "s", "t", flops=(6.0, 2.0))
    assert (sp.median, sp.q25, sp.q75, sp.iqr) == (3.0, 2.0, 4.0, 2.0)
    assert sp.efficiency == pytest.approx(1.0)
    with pytest.raises(ValueError):
        speedup_from_ratios([], "d", "s", "t")


def test_transport_registry(tiny_models):
    with pytest.raises(ConfigError, match="is not a transport"):
        open_transport(Target("x", transport="qemu-arm64://img", python="python3"))
    seen = []

    class Recording:
        def __init__(self, target):
            from slimship.runtimes.transports import LocalTransport

            self.inner = LocalTransport(target)

        def __getattr__(self, name):
            seen.append(name)
            return getattr(self.inner, name)

    register_transport("recording", Recording)
    try:
        t = Target("rec", transport="recording://anything", python=sys.executable)
        m = measure(tiny_models["slim"]["tflite"], [tiny_models["x"]], t, runs=2)
        assert m.latency.n == 2 and {"prepare", "put", "run", "get", "cleanup"} <= set(seen)
    finally:
        from slimship.runtimes import transports

        transports.TRANSPORT_FACTORIES.pop("recording")


FAKE_ADB = textwrap.dedent(
    """\
    #!{python}
    # STAND-IN for Android's adb (not installed here): performs push/pull/shell on the local filesystem.
    import shutil, subprocess, sys
    args = sys.argv[1:]
    assert args[0] == "-s", args
    serial, verb, rest = args[1], args[2], args[3:]
    if serial != "FAKE123":
        sys.stderr.write(f"adb: device '{{serial}}' not found\\n"); sys.exit(1)
    with open({log!r}, "a") as log:
        log.write(verb + "\\n")
    if verb in ("push", "pull"):
        shutil.copyfile(rest[0], rest[1]); sys.exit(0)
    if verb == "shell":
        sys.exit(subprocess.run(["sh", "-c", rest[0]]).returncode)
    sys.exit(2)
    """
)


def test_adb_transport_against_fake_adb(tmp_path, monkeypatch, tiny_models):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "adb.log"
    adb = bindir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable, log=str(log)))
    adb.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the fake device's mktemp -d: here, not the shared /tmp
    target = Target("phone", transport="adb://FAKE123", python=sys.executable, threads=1)
    ref = TorchRunner(tiny_models["dense"]["module"])
    m = measure(tiny_models["dense"]["tflite"], [tiny_models["x"]], target, runs=3, reference=ref)
    assert m.latency.n == 3 and m.parity.max_abs < 1e-4
    verbs = log.read_text().split()
    assert {"push", "shell", "pull"} <= set(verbs) and verbs[-1] == "shell"  # last: rm -rf of the workdir
    with pytest.raises(TargetError, match="FAKE999 is not available"):
        measure(
            tiny_models["dense"]["tflite"],
            [tiny_models["x"]],
            Target("p", transport="adb://FAKE999", python=sys.executable),
            runs=1,
        )


def test_parity_figures_count_nan_and_inf_out_of_place():
    ref = [np.array([[1.0, 2.0], [np.nan, 4.0]], dtype=np.float32)]
    assert parity([ref[0].copy()], ref).max_abs == 0.0  # NaN where the reference has NaN: equal
    got = [np.array([[1.0, np.nan], [np.nan, 4.0]], dtype=np.float32)]
    assert np.isinf(parity(got, ref).max_abs) and np.isinf(parity(got, ref).max_rel)
    flipped = [np.array([[1.0, 2.0], [np.nan, -np.inf]], dtype=np.float32)]
    assert np.isinf(parity(flipped, ref).max_abs)
    assert device_runner._top1(got) == [-1, -1] and device_runner._top1(ref) == [1, -1]
