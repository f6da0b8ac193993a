"""Session fixtures for the release tests: a tiny CNN exported once to ONNX and TFLite, and chromium."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slimship.pipeline.release import ReleaseInputs, ReleaseResult, write_release
from tests.parallel import machine_lock


class TinyCNN(torch.nn.Module):
    """conv-bn-relu x2, global pool, linear: 3x16x16 images, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(6)
        self.conv2 = torch.nn.Conv2d(6, 5, 3, padding=1)
        self.fc = torch.nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.onnx and model.tflite of one TinyCNN (seed 0), plus its weights, exported once."""
    import litert_torch

    torch.manual_seed(0)
    model = TinyCNN().eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 16, 16)
    out = tmp_path_factory.mktemp("tiny-model")
    torch.save(model.state_dict(), out / "weights.pt")
    torch.save(x, out / "x.pt")
    torch.onnx.export(model, (x,), str(out / "model.onnx"), dynamo=True)
    litert_torch.convert(model, (x,)).export(str(out / "model.tflite"))
    return out


def load_tiny(model_dir: Path) -> tuple[TinyCNN, torch.Tensor]:
    model = TinyCNN().eval()
    model.load_state_dict(torch.load(model_dir / "weights.pt", weights_only=True))
    return model, torch.load(model_dir / "x.pt", weights_only=True)


@pytest.fixture
def release_inputs(tiny_model_dir: Path) -> ReleaseInputs:
    """Inputs of a realistic release of the tiny CNN (fresh copy per test)."""
    return make_release_inputs(tiny_model_dir)


@pytest.fixture(scope="session")
def released(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ReleaseResult:
    """One release of the tiny CNN, shared by the tests that only read it (copy it before changing it)."""
    return write_release(make_release_inputs(tiny_model_dir), tmp_path_factory.mktemp("released"))


def make_release_inputs(tiny_model_dir: Path) -> ReleaseInputs:
    model, x = load_tiny(tiny_model_dir)
    source_sha = hashlib.sha256((tiny_model_dir / "weights.pt").read_bytes()).hexdigest()
    gen = torch.Generator().manual_seed(1)
    samples = lambda base: [round(base + 0.2 * float(v), 4) for v in torch.rand(40, generator=gen)]  # noqa: E731
    return ReleaseInputs(
        name="tiny-cnn",
        version="1.0.0",
        slim_module=model,
        example_inputs=(x,),
        model_files={"onnx": tiny_model_dir / "model.onnx", "tflite-fp32": tiny_model_dir / "model.tflite"},
        reference={
            "inputs": [{"name": "image", "shape": [1, 3, 16, 16], "dtype": "float32"}],
            "output_names": ["logits"],
            "source_sha256": source_sha,
            "layout": "NCHW",
            "preprocessing": "RGB scaled to [0, 1], then normalised per channel (mean 0.5, std 0.25)",
        },
        slimming={
            "params_before": 1200,
            "params_after": 640,
            "flops_before": 250000,
            "flops_after": 120000,
            "per_layer": {
                "conv1": {"channels_before": 12, "channels_kept": 6},
                "conv2": {"channels_before": 10, "channels_kept": 5},
            },
        },
        parity={
            "onnx": {"max_abs_diff": 1e-6, "max_rel_diff": 1e-5, "tolerance": 1e-4},
            "tflite-fp32": {"max_abs_diff": 2e-6, "max_rel_diff": float("inf"), "tolerance": 1e-4},
        },
        accuracy={
            "dense-torch": {"top1": 91.0, "top5": 99.0},
            "slim-torch": {"top1": 90.5, "top5": 99.0},
            "slim-onnx": {"top1": 90.5, "top5": 99.0},
            "slim-tflite-fp32": {"top1": 90.5, "top5": 98.5},
        },
        latency={
            "x86-ort-4t": {
                "p50_ms": 1.1,
                "p90_ms": 1.3,
                "p99_ms": 1.6,
                "dense_p50_ms": 2.0,
                "speedup": 1.82,
                "emulated": False,
                "variant": "slim-onnx",
                "dense_variant": "dense-torch",
                "samples": samples(1.0),
                "dense_samples": samples(1.9),
            },
            "pi4-litert-emu": {
                "p50_ms": 4.2,
                "p90_ms": 4.6,
                "p99_ms": 5.0,
                "dense_p50_ms": 7.5,
                "speedup": 1.7,
                "emulated": True,
                "variant": "slim-tflite-fp32",
                "samples": samples(4.1),
            },
        },
        config={"seed": 0, "slimming": {"tolerance": 1e-5}, "targets": ["x86-ort-4t", "pi4-litert-emu"]},
        extra_plots={
            "HESSO sparsity curve": {
                "x": [0, 1, 2, 3],
                "y": [0.0, 0.2, 0.4, 0.5],
                "xlabel": "epoch",
                "ylabel": "group sparsity",
            },
            "hesso training": {
                "series": {
                    "loss": {"x": [1, 2, 3, 4], "y": [1.9, 0.8, 0.5, 0.4]},
                    "lr": {"x": [1, 2, 3, 4], "y": [3e-3, 1.5e-3, 3e-4, 3e-5]},
                    "train_accuracy": {"x": [1, 2, 3, 4], "y": [40.0, 80.0, 90.0, 93.0]},
                    "group_sparsity": {"x": [1, 2, 3, 4], "y": [0.0, 0.2, 0.4, 0.5]},
                },
                "xlabel": "epoch",
            },
            "ADC policy": {
                "kind": "barh",
                "labels": ["conv1.weight[0]", "conv2.weight[0]"],
                "values": [0.5, 0.25],
                "xlabel": "kept fraction",
            },
        },
        model_card_notes="For tests only: a random-init CNN, not trained on any data.",
        gates=[
            {
                "gate": "max_accuracy_drop",
                "status": "passed",
                "subject": "torch top-1",
                "figure": 0.5,
                "limit": 1.0,
                "detail": "",
            },
            {
                "gate": "min_speedup",
                "status": "off",
                "subject": "",
                "figure": None,
                "limit": None,
                "detail": "",
            },
            {
                "gate": "min_agreement",
                "status": "not evaluated",
                "subject": "",
                "figure": None,
                "limit": 0.9,
                "detail": "no quantised variant",
            },
        ],
    )


@pytest.fixture
def fresh_inputs(release_inputs: ReleaseInputs):
    """Factory: a copy of release_inputs with some fields replaced."""
    return lambda **changes: replace(release_inputs, **changes)


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable chromium; installed from Debian when root and missing."""
    found = next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)
    if found is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        with machine_lock("apt"):  # one dpkg at a time: a parallel worker may be installing it too
            found = shutil.which("chromium")
            if found is None:
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                run = {"check": False, "capture_output": True, "env": env}
                subprocess.run(["apt-get", "update", "-qq"], timeout=300, **run)
                subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], timeout=600, **run)
                found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and cannot be installed here (not root or no apt-get)")
    return found
