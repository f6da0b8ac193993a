"""`slimship bench`: a speedup only within one format and precision, a dense .pt2 exported into the slim
files' formats, per-model memory, precision per row, and per-layer profiles with module names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimship.cli import main
from slimship.exporters.registry import ExportRequest, export_formats
from slimship.runtimes.measure import bench, where_measured
from slimship.runtimes.targets import get_target


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dense Net(16) as .pt2 and .onnx; a slim Net(8) as .onnx and .tflite (fp32)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench_pairs")
    x = (torch.randn(1, 3, 12, 12),)
    dense, slim = Net(16).eval(), Net(8).eval()
    torch.export.save(torch.export.export(dense, x), str(root / "dense.pt2"))
    out = {"dense.pt2": root / "dense.pt2"}
    request = ExportRequest(dense, x, x, dynamic_batch=False)
    out["dense.onnx"] = export_formats(["onnx"], request, root, "dense")["onnx"].path
    request = ExportRequest(slim, x, x, dynamic_batch=False)
    for fmt, result in export_formats(["onnx", "tflite-fp32"], request, root, "slim").items():
        out[f"slim.{fmt}"] = Path(result.path)
    return out


def _inputs() -> list[np.ndarray]:
    return [np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)]


def test_an_onnx_dense_gives_a_tflite_file_no_speedup_and_says_why(files) -> None:
    slim_onnx, slim_tflite = files["slim.onnx"], files["slim.tflite-fp32"]
    result = bench([files["dense.onnx"], slim_onnx, slim_tflite], get_target("mobile-1t"), _inputs(),
                   dense=files["dense.onnx"], runs=3, warmup=1)  # fmt: skip
    assert [s.slim for s in result.speedups] == [str(slim_onnx)]
    assert result.speedups[0].format == "onnx"
    assert len(result.notes) == 1 and str(slim_tflite) in result.notes[0] and "no speedup" in result.notes[0]
    rows = {m.model: m for m in result.measurements}
    assert rows[str(slim_tflite)].format == "tflite-fp32" and rows[str(slim_tflite)].precision == "fp32"
    assert result.where == "local profile (this machine)"


def test_a_pt2_dense_is_exported_into_each_slim_format_and_paired(files, tmp_path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", str(files["slim.onnx"]), str(files["slim.tflite-fp32"]), "--target", "mobile-1t",
            "--dense", str(files["dense.pt2"]), "--input-shape", "3", "12", "12", "--runs", "3",
            "--warmup", "1", "--profile", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    pairs = {s["slim"]: s for s in data["speedups"]}
    assert set(pairs) == {str(files["slim.onnx"]), str(files["slim.tflite-fp32"])}
    assert {s["format"] for s in pairs.values()} == {"onnx", "tflite-fp32"}
    assert all(s["dense"] == f"{files['dense.pt2']} as {s['format']}" for s in pairs.values())
    dense_rows = [m for m in data["measurements"] if m["model"].startswith(str(files["dense.pt2"]))]
    assert sorted(m["format"] for m in dense_rows) == ["onnx", "tflite-fp32"]
    assert all(m["model_rss_kb"] is None or m["model_rss_kb"] >= 0 for m in data["measurements"])
    assert any(m["model_rss_kb"] for m in data["measurements"])  # measured per model on Linux
    profiles = {p["slim"]: p for p in data["profiles"]}
    onnx_rows = profiles[str(files["slim.onnx"])]["rows"]
    assert {"conv1", "conv2", "head"} <= {r["layer"] for r in onnx_rows}  # the source's module names
    head = next(r for r in onnx_rows if r["layer"] == "head")
    assert head["flops_ratio"] == pytest.approx(2.0, rel=0.01)  # its inner dim 16 -> 8
    assert all(r["dense_ms"] > 0 and isinstance(r["poor"], bool) for r in onnx_rows)
    assert profiles[str(files["slim.tflite-fp32"])]["rows"] == []
    assert "litert" in profiles[str(files["slim.tflite-fp32"])]["note"]


def test_where_a_figure_was_measured_is_named() -> None:
    assert where_measured(get_target("mobile-1t")) == "local profile (this machine)"
    assert where_measured(get_target("arm64-emu-litert")).startswith("emulated")
    remote = get_target("mobile-1t").with_overrides(transport="ssh://u@h")
    assert where_measured(remote) == "device (ssh://u@h)"


def test_model_memory_is_the_models_own_not_the_process(tmp_path) -> None:
    """Each model's load is measured in its own process after the runtime import: a 16 MB weight makes
    the model's figure at least 14 MB larger than a tiny model's (the rest is the session's own cost)."""
    from slimship.runtimes.measure import measure

    x = (torch.randn(1, 2048),)
    sizes = {}
    for name, width in (("big", 2048), ("tiny", 8)):
        request = ExportRequest(nn.Linear(2048, width).eval(), x, x, dynamic_batch=False)
        path = export_formats(["onnx"], request, tmp_path, name)["onnx"].path
        sizes[name] = measure(path, [x[0].numpy()], get_target("host"), warmup=1, runs=2).model_rss_kb
    assert sizes["big"] - sizes["tiny"] >= 14 * 1024 and sizes["tiny"] > 0
