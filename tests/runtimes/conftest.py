"""Tiny CNNs exported to ONNX and TFLite once per module, plus shared inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, width: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def _export(model: nn.Module, x: torch.Tensor, out: Path, onnx: bool = True) -> dict[str, Path]:
    import litert_torch

    paths = {"tflite": out / "model.tflite"}
    litert_torch.convert(model, (x,)).export(str(paths["tflite"]))
    if onnx:
        paths["onnx"] = out / "model.onnx"
        torch.onnx.export(model, (x,), str(paths["onnx"]), dynamo=True)
    return paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Dense (width 16; ONNX and TFLite) and slim (width 8; TFLite) TinyCNNs."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16, 16)
    root = tmp_path_factory.mktemp("tiny_models")
    result = {"x": x.numpy()}
    for name, width in (("dense", 16), ("slim", 8)):
        model = TinyCNN(width).eval()
        d = root / name
        d.mkdir()
        result[name] = {"module": model, **_export(model, x, d, onnx=name == "dense")}
    return result
