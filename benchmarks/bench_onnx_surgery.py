"""Side by side: slimship surgery vs onnxslim on the SAME raw dynamo export of three small models.

Prints node count, file size and onnxruntime latency (median over interleaved runs) per model and tool.
Run: /work/venv/bin/python benchmarks/bench_onnx_surgery.py [--runs 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxslim
import torch
from torch import nn

from slimship.exporters import run_surgery
from slimship.runtimes import get_target
from slimship.runtimes.device_runner import open_runner
from slimship.runtimes.execute import run_on_target


def conv_bn_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Dropout(0.1), nn.Flatten(), nn.Linear(32 * 16 * 16, 10),
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )
        self.b = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.skip(x))


def small_resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip


class TinyViT(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, patch: int = 4) -> None:
        super().__init__()
        self.heads, self.patch = heads, patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "n1": nn.LayerNorm(dim),
                    "qkv": nn.Linear(dim, 3 * dim),
                    "proj": nn.Linear(dim, dim),
                    "n2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(
                        nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * dim, dim)
                    ),
                }
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # B, T, D
        b, t, d = x.shape
        for layer in self.layers:
            q, k, v = (
                layer["qkv"](layer["n1"](x))
                .reshape(b, t, 3, self.heads, d // self.heads)
                .permute(2, 0, 3, 1, 4)
            )
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
            x = x + layer["proj"]((att @ v).transpose(1, 2).reshape(b, t, d))
            x = x + layer["mlp"](layer["n2"](x))
        return self.head(x.mean(1))


def randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def latency(paths: dict[str, Path], x: np.ndarray, runs: int) -> dict[str, float]:
    """Median ms per tool on `mobile-1t` (1 thread, core 0), runs interleaved (a, b, c, a, b, c ...) so
    drift hits all alike."""
    run = run_on_target(get_target("mobile-1t"), list(paths.values()), [x], warmup=10, runs=runs)
    return {k: statistics.median(e["latencies_ms"]) for k, e in zip(paths, run.result["models"], strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    models = {
        "conv-bn cnn": (randomize_bn(conv_bn_cnn()), torch.randn(1, 3, 32, 32)),
        "small resnet": (randomize_bn(small_resnet()), torch.randn(1, 3, 32, 32)),
        "tiny vit": (TinyViT().eval(), torch.randn(1, 3, 32, 32)),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, x) in models.items():
            raw = Path(tmp) / f"{name}.raw.onnx"
            # unoptimised dynamo export: both tools start from exactly this file
            torch.onnx.export(
                model, (x,), str(raw), dynamo=True, opset_version=18, optimize=False,
                input_names=["input"], output_names=["output"], external_data=False,
            )  # fmt: skip
            base = onnx.load(str(raw))
            paths = {
                "raw": raw,
                "slimship": Path(tmp) / f"{name}.ours.onnx",
                "onnxslim": Path(tmp) / f"{name}.slim.onnx",
            }
            t0 = time.perf_counter()
            ours, _ = run_surgery(base)
            t_ours = time.perf_counter() - t0
            onnx.save(ours, str(paths["slimship"]))
            t0 = time.perf_counter()
            slim = onnxslim.slim(onnx.load(str(raw)))
            t_slim = time.perf_counter() - t0
            onnx.save(slim, str(paths["onnxslim"]))
            ref = model(x).detach().numpy()
            for tool, path in paths.items():
                out = open_runner(str(path)).run([x.numpy()])[0]
                assert np.max(np.abs(out - ref)) <= 1e-4 * max(1, np.abs(ref).max()), (name, tool)
            lat = latency(paths, x.numpy(), args.runs)
            for tool, path in paths.items():
                model_proto = onnx.load(str(path))
                rows.append((name, tool, len(model_proto.graph.node), path.stat().st_size, lat[tool],
                             {"slimship": t_ours, "onnxslim": t_slim}.get(tool)))  # fmt: skip
    print(f"{'model':14} {'tool':9} {'nodes':>6} {'bytes':>9} {'ort ms':>8} {'tool s':>7}")
    for name, tool, nodes, size, ms, secs in rows:
        tool_s = f"{secs:7.2f}" if secs is not None else "      -"
        print(f"{name:14} {tool:9} {nodes:6d} {size:9d} {ms:8.3f} {tool_s}")
    print("\nratios slimship / onnxslim (nodes, bytes, latency):")
    for name in models:
        ours = next(r for r in rows if r[0] == name and r[1] == "slimship")
        slim = next(r for r in rows if r[0] == name and r[1] == "onnxslim")
        print(f"  {name:14} {ours[2] / slim[2]:.2f}  {ours[3] / slim[3]:.3f}  {ours[4] / slim[4]:.2f}")


if __name__ == "__main__":
    main()
