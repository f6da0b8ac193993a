"""Where a slim model's time goes, per layer kind: dense vs plain vs latency-aware slim (onnxruntime profile).

    PYTHONPATH=. python benchmarks/profile_latency_counts.py [--model mobilenetv2] [--res 224] [--runs 30]

The model and zeroing are bench_slim_speedup.py's. onnxruntime's per-node kernel times (its profiler, via
`slimship.runtimes.profile.profile_onnx`, sessions interleaved, 1 thread) are attributed to the PyTorch
layers and summed per kind: the stem, 1x1 expansions, depthwise convs, 1x1 projections (and v1's
pointwise convs), the 1x1 head conv, the FC and the ops without weights (layout reorders, adds, pools).
Per kind: time dense and slim, speedup, FLOPs ratio and efficiency (speedup / FLOPs ratio).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slim_speedup import MODELS, export, randomize, zero_groups

from slimship import slim
from slimship.runtimes import get_target
from slimship.runtimes.latency_table import MeasuredLatency
from slimship.runtimes.profile import profile_onnx
from slimship.slimming.channel_counts import LatencyAwareCounts


def kind_of(model: nn.Module, layer: str) -> str:
    """The layer's kind from the dense module: stem, expand, depthwise, project, head, fc; else the op."""
    if layer.startswith("other: "):
        return layer
    try:
        m = model.get_submodule(layer)
    except AttributeError:
        return "?"
    if isinstance(m, nn.Linear):
        return "fc"
    if not isinstance(m, nn.Conv2d):
        return type(m).__name__
    if m.groups > 1:
        return "depthwise"
    if m.in_channels == 3:
        return "stem"
    if m.kernel_size != (1, 1):
        return f"conv{m.kernel_size[0]}x{m.kernel_size[1]}"
    if m.out_channels > m.in_channels * 2:
        return "1x1 expand" if m.out_channels < 1280 else "1x1 head"
    return "1x1 project/pointwise"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args(argv)
    model = randomize(MODELS[args.model](), 0)
    x = torch.randn(1, 3, args.res, args.res, generator=torch.Generator().manual_seed(0))
    zero_groups(model, x, 0.5, 0.1, 0)
    target = get_target("mobile-1t").with_overrides(runtime="onnxruntime")
    variants = {
        "plain": slim(model, (x,)),
        "aligned-8": slim(model, (x,), channel_multiple=8),
        "latency": slim(model, (x,), channel_counts=LatencyAwareCounts(MeasuredLatency(target, "onnx"))),
    }
    xs = [np.random.default_rng(0).standard_normal((1, 3, args.res, args.res)).astype(np.float32)]
    os.sched_setaffinity(0, {0})
    print(f"{args.model}, {args.res}x{args.res}, onnxruntime 1 thread, {args.runs} interleaved runs, "
          f"1-min load {os.getloadavg()[0]:.1f}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dense = export(model, x, Path(tmp) / "dense", ["onnxruntime"])["onnxruntime"]
        for name, result in variants.items():
            path = export(result.model, x, Path(tmp) / name, ["onnxruntime"])["onnxruntime"]
            prof = profile_onnx(dense, path, xs, runs=args.runs)
            kinds: dict[str, list[float]] = {}
            for t in prof.layers:
                cell = kinds.setdefault(kind_of(model, t.layer), [0.0] * 4)
                for i, v in enumerate((t.dense_us, t.slim_us, t.dense_flops, t.slim_flops)):
                    cell[i] += v
            total = [sum(c[i] for c in kinds.values()) for i in range(4)]
            print(f"\n{name} (FLOPs ratio {result.flops_ratio:.2f}x, whole-model kernel time "
                  f"{total[0] / total[1]:.2f}x):\n")  # fmt: skip
            print("| kind | dense us | slim us | speedup | FLOPs ratio | efficiency | share of slim time |")
            print("|---|---|---|---|---|---|---|")
            for kind, (du, su, df, sf) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
                fr = df / sf if sf else None
                eff = f"{du / su / fr:.2f}" if fr and su else "-"
                fr_s = f"{fr:.2f}x" if fr else "-"
                print(f"| {kind} | {du:.0f} | {su:.0f} | {du / su:.2f}x | {fr_s} | {eff} "
                      f"| {su / total[1]:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
