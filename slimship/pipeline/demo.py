"""The built-in job of `slimship demo`: digits CNN -> HESSO -> slim -> ONNX/TFLite -> bench -> release."""

from __future__ import annotations

from typing import Any

from slimship.pipeline.config import PipelineConfig, validate

DEMO_CONFIG: dict[str, Any] = {
    "seed": 0,
    "model": {
        "factory": "slimship.models:digits_cnn",
        "kwargs": {"widths": [64, 128, 128]},
        "input_shape": [1, 8, 8],
    },
    "data": {"factory": "slimship.data:digits_loaders", "kwargs": {"batch_size": 64, "seed": 0}},
    "train": {"epochs": 4, "lr": 0.003},
    "compress": {"method": "hesso", "options": {"target": 0.6, "epochs": 8, "lr": 0.02}},
    "export": {"formats": ["onnx", "tflite-fp32"]},
    "targets": ["mobile-1t"],
    "bench": {"runs": 60, "warmup": 10},
    "release": {"name": "digits-cnn", "version": "0.1.0", "out": "artifacts"},
}


def demo_config(overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The demo job as a validated config, with `overrides` (e.g. release.out, gates) merged in."""
    return validate(DEMO_CONFIG, "demo", overrides)
