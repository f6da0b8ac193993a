"""Per-layer profiles (onnxruntime profiler, ExecuTorch ETDump): layers named, FLOPs exact, dense vs slim."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimship
from slimship.errors import TargetError
from slimship.exporters import export_onnx
from slimship.exporters.executorch_export import executorch_available, export_executorch
from slimship.runtimes.profile import profile_models


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(), Block(), *head).eval()
    x = torch.randn(2, 3, 16, 16)
    zeroed = copy.deepcopy(model)
    slimship.zero_random_groups(zeroed, x, fraction=0.5, seed=0)
    return model, slimship.slim(zeroed, x).model, x


def test_onnx_profile_names_layers_and_counts_their_flops(pair, tmp_path) -> None:
    dense, slim_model, x = pair
    export_onnx(dense, (x,), tmp_path / "d.onnx")
    export_onnx(slim_model, (x,), tmp_path / "s.onnx")
    profile = profile_models(tmp_path / "d.onnx", tmp_path / "s.onnx", [x[:1].numpy()], runs=3)
    rows = {r["layer"]: r for r in profile.rows()}
    assert {"0", "1.conv", "2.conv", "5"} <= set(rows)
    kept = [int(v.shape[0]) for k, v in slim_model.state_dict().items() if k.endswith("conv.weight")]
    for name, out_kept in zip(("1.conv", "2.conv"), kept, strict=True):
        in_kept = int(slim_model.state_dict()["0.weight"].shape[0]) if name == "1.conv" else kept[0]
        # FLOPs of the kernels onnxruntime ran: exact for dense; slim may be padded to its block of 8
        assert rows[name]["dense_flops"] == 2 * 16 * 16 * 9 * 16 * 16
        assert 2 * out_kept * in_kept * 9 * 16 * 16 <= rows[name]["slim_flops"] < rows[name]["dense_flops"]
        assert rows[name]["dense_ms"] > 0 and rows[name]["slim_ms"] > 0
    assert abs(sum(r["share"] for r in profile.rows()) - 1.0) < 1e-6


@pytest.mark.skipif(not executorch_available(), reason="executorch is not installed")
def test_executorch_profile_times_each_xnnpack_kernel(pair, tmp_path) -> None:
    dense, slim_model, x = pair
    export_executorch(dense, (x,), tmp_path / "d.pte")
    export_executorch(slim_model, (x,), tmp_path / "s.pte")
    profile = profile_models(tmp_path / "d.pte", tmp_path / "s.pte", [x[:1].numpy()], runs=3)
    layers = {r["layer"] for r in profile.rows()}
    assert {"Convolution #1", "Convolution #2", "Convolution #3", "Fully Connected #1"} <= layers
    assert profile.runtime == "executorch" and "FLOPs" in profile.note


def test_profile_refuses_two_formats(tmp_path) -> None:
    with pytest.raises(TargetError, match="one format"):
        profile_models(tmp_path / "a.onnx", tmp_path / "b.pte", [])
