"""The emulated ARM64 target: preparation errors (fast) and parity on the ARM64 runtime builds (slow)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimship.errors import TargetError
from slimship.runtimes import arm64_provision
from slimship.runtimes.arm64_emu import Arm64EmuTransport, check_arm64_parity, run_device_runner_arm64
from slimship.runtimes.arm64_env import Arm64Env, run_python
from slimship.runtimes.arm64_provision import RUNTIMES, prepare_arm64
from tests.parallel import free_port

# ----------------------------------------------------------------------------- fast: errors


def test_unreachable_debian_mirror_gives_clear_error_and_leaves_no_partial_part(tmp_path: Path) -> None:
    mirror = f"http://127.0.0.1:{free_port()}/debian"
    with pytest.raises(TargetError) as info:
        prepare_arm64(tmp_path, runtimes=["litert"], progress=False, debian_mirror=mirror)
    message = str(info.value)
    assert "Debian archive" in message
    assert "SLIMSHIP_DEBIAN_MIRROR" in message
    assert "127.0.0.1" in message
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock")
    assert leftovers == []


def test_unreachable_pypi_names_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{port}/simple")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(TargetError, match=r"from PyPI.*Check that PyPI"):
        arm64_provision._pip_download(["tflite-runtime==2.14.0"], tmp_path / "wheels", "tflite_runtime")


def test_cache_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    with pytest.raises(TargetError, match="cache directory"):
        prepare_arm64(blocker / "arm64", runtimes=["litert"], progress=False)


def test_unknown_runtime_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="unknown ARM64 runtime"):
        prepare_arm64(tmp_path, runtimes=["tensorrt"], progress=False)
    assert not any(tmp_path.iterdir())


def test_runtime_not_prepared_is_refused(tmp_path: Path) -> None:
    env = Arm64Env(tmp_path, tmp_path / "qemu-aarch64", tmp_path / "sysroot", {}, {})
    with pytest.raises(TargetError, match=r"'onnxruntime' was not prepared.*prepare_arm64"):
        run_python(env, "onnxruntime", ["-c", "pass"])


def test_wheel_with_escaping_path_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("evil/__init__.py", "")
        archive.writestr("../outside.py", "x = 1")
    site = tmp_path / "site"
    with pytest.raises(TargetError, match="unsafe path"):
        arm64_provision._unpack_wheel(wheel, site)
    assert not (tmp_path / "outside.py").exists()


def test_wheel_data_purelib_lands_in_site_root(tmp_path: Path) -> None:
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/__init__.py", "A = 1\n")
        archive.writestr("pkg-1.0.data/purelib/extra_mod.py", "B = 2\n")
        archive.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    site = tmp_path / "site"
    arm64_provision._unpack_wheel(wheel, site)
    assert (site / "pkg" / "__init__.py").read_text() == "A = 1\n"
    assert (site / "extra_mod.py").read_text() == "B = 2\n"
    assert not (site / "tool").exists() and not (site / "pkg-1.0.data").exists()


# ----------------------------------------------------------------------------- slow: real emulation


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="session")
def arm64_env() -> Arm64Env:
    """Prepared once per session into the default cache and reused by later sessions."""
    return prepare_arm64(runtimes=RUNTIMES, progress=False)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A slim model: half of TinyCNN's channel groups zeroed, then removed by `slimship.slim`."""
    import litert_torch

    from slimship import slim, zero_random_groups

    torch.manual_seed(0)
    dense = TinyCNN().eval()
    with torch.no_grad():
        dense.features[3].running_mean.uniform_(-0.5, 0.5)
        dense.features[3].running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    zero_random_groups(dense, torch.randn(2, 3, 16, 16), fraction=0.5, seed=0)
    slimmed = slim(dense, torch.randn(2, 3, 16, 16))
    assert slimmed.params_after < slimmed.params_before
    model = slimmed.model
    with torch.no_grad():
        reference = model(x).numpy()
    out = tmp_path_factory.mktemp("arm64-models")
    tflite, onnx = out / "tiny.tflite", out / "tiny.onnx"
    litert_torch.convert(model, (x,)).export(str(tflite))
    torch.onnx.export(model, (x,), str(onnx), dynamo=True)
    return {"tflite": tflite, "onnx": onnx, "x": x.numpy(), "reference": reference}


def _model_for(runtime: str, models: dict[str, object]) -> Path:
    return models["onnx"] if runtime == "onnxruntime" else models["tflite"]  # type: ignore[return-value]


@pytest.mark.slow
def test_emulated_python_is_aarch64_through_the_transport(arm64_env: Arm64Env, tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, platform, numpy\n"
        "json.dump({'machine': platform.machine(), 'numpy': numpy.__version__}, open('probe.json', 'w'))\n"
    )
    transport = Arm64EmuTransport("tflite_runtime", cache_dir=arm64_env.root)
    transport.prepare()
    try:
        transport.put(script, "probe.py")
        proc = transport.run(["probe.py"], timeout=300)
        assert proc.returncode == 0, proc.stderr
        probe = json.loads(transport.get("probe.json", tmp_path / "probe.json").read_text())
        with pytest.raises(TargetError, match="leaves the work directory"):
            transport.put(script, "../escape.py")
    finally:
        transport.cleanup()
    assert probe["machine"] == "aarch64"
    bare = run_python(arm64_env, None, ["-c", "import platform; print(platform.machine())"], timeout=300)
    assert (bare.returncode, bare.stdout.strip()) == (0, "aarch64")
    assert probe["numpy"] == arm64_env.versions["tflite_runtime:numpy"]
    assert int(probe["numpy"].split(".")[0]) < 2  # tflite-runtime 2.14 needs numpy 1.x


@pytest.mark.slow
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_arm64_parity_with_pytorch(arm64_env: Arm64Env, tiny_models: dict[str, object], runtime: str) -> None:
    parity = check_arm64_parity(
        _model_for(runtime, tiny_models),
        [tiny_models["x"]],  # type: ignore[list-item]
        [tiny_models["reference"]],  # type: ignore[list-item]
        runtime,
        env=arm64_env,
    )
    assert parity.backend["backend"] == runtime
    assert parity.max_rel_diff <= 1e-5, parity
    assert parity.passed
    assert parity.qemu_version == arm64_env.qemu_version


@pytest.mark.slow
def test_runner_result_keeps_emulated_timings_apart(
    arm64_env: Arm64Env, tiny_models: dict[str, object], tmp_path: Path
) -> None:
    np.savez(tmp_path / "inputs.npz", in0=tiny_models["x"])
    out_json = tmp_path / "result.json"
    result = run_device_runner_arm64(
        arm64_env,
        tiny_models["tflite"],  # type: ignore[arg-type]
        tmp_path / "inputs.npz",
        out_json,
        runtime="litert",
        runs=2,
        warmup=1,
        save_outputs=tmp_path / "outputs.npz",
    )
    assert result["ok"] and result["emulated"] is True and result["arch"] == "aarch64"
    assert result["qemu_version"] == arm64_env.qemu_version
    assert "latencies_ms" not in result and "load_ms" not in result
    assert len(result["emulated_latencies_ms"]) == 2
    assert json.loads(out_json.read_text()) == result  # the file on disk says the same
    with np.load(tmp_path / "outputs.npz") as data:
        np.testing.assert_allclose(data["out0"], tiny_models["reference"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_runner_error_is_raised_with_its_text(
    arm64_env: Arm64Env, tiny_models: dict[str, object], tmp_path: Path
) -> None:
    np.savez(tmp_path / "inputs.npz", in0=tiny_models["x"])
    with pytest.raises(TargetError, match="runtime 'litert' cannot run ONNX files"):
        run_device_runner_arm64(
            arm64_env,
            tiny_models["onnx"],  # type: ignore[arg-type]
            tmp_path / "inputs.npz",
            tmp_path / "result.json",
            runtime="litert",
        )
