"""Does slimming deliver its FLOPs cut as wall-clock speedup? ResNet-18, MobileNet v1/v2 layouts, 1 thread.

    PYTHONPATH=. python benchmarks/bench_slim_speedup.py [--quick] [--target mobile-1t] [--runs 40]
        [--models resnet18,mobilenetv1,mobilenetv2] [--runtimes onnxruntime,litert,executorch]
        [--fraction 0.5] [--jitter 0.1] [--res 224] [--multiple onnxruntime=8,litert=16] [--out results.md]

Each model is built with random weights and random BatchNorm running statistics (eval mode, batch 1).
About half of its removable channel groups are zeroed: per channel space a fraction drawn from
fraction +- jitter (uneven widths, as sparse training leaves them; `--jitter 0` is exactly
`zero_random_groups(fraction=...)`, whose halves of 64..512 are already multiples of 8). It is then
slimmed twice: plainly, and with `channel_multiple` set to the multiple that runtime's kernels
favour for the op kinds the model contains (3x3 conv, 1x1 conv, depthwise conv), each measured with
`measure_alignment` on the same target (a staircase of latency vs output channels; see
slimship/runtimes/alignment.py) and combined with `multiple_for_kinds`. Dense, slim and
aligned-slim models are exported to ONNX, TFLite fp32 and ExecuTorch fp32 (XNNPACK delegate) and timed
on the target in ONE process, interleaved (dense, slim, aligned, dense, slim, aligned ...); a speedup
is the median of the per-round ratios dense/slim, and efficiency = speedup / FLOPs ratio (1.0: the
FLOPs cut is fully turned into time).

When no multiple is favoured (flat latency, alignment buys nothing) the aligned column uses
--fallback-multiple (default 8) as a counter-check, labelled "not favoured".
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimship import find_groups, slim, zero_random_groups
from slimship.exporters import export_onnx, export_tflite
from slimship.exporters.executorch_export import export_executorch
from slimship.runtimes import get_target
from slimship.runtimes.alignment import (
    SWEEP_SPATIAL,
    AlignmentResult,
    measure_alignment_kinds,
    multiple_for_kinds,
)
from slimship.runtimes.execute import run_on_target
from slimship.runtimes.measure import Speedup, speedup_from_ratios
from slimship.runtimes.targets import BUILTIN_TARGETS, Target
from slimship.slimming import zero_group

FORMATS = {"onnxruntime": "onnx", "litert": "tflite", "executorch": "pte"}
TARGET_EFFICIENCY = 0.85
log = logging.getLogger("bench_slim_speedup")
# --quick: each multiple b of 8 and b + 1 (the step), plus counts that round up to them (TFLite one-layer
# models are slow to convert, so the full 24..64 sweep costs minutes)
QUICK_SWEEP = (28, 32, 33, 36, 40, 41, 44, 48, 49, 52, 56, 57, 60, 64)
# the conv kinds each model's channel spaces go through (`op_kinds` reads them and the FC from the graph)
MODEL_KINDS = {
    "resnet18": ("conv", "conv1x1"),
    "mobilenetv1": ("conv", "conv1x1", "dwconv"),
    "mobilenetv2": ("conv", "conv1x1", "dwconv"),
}


# ---------------------------------------------------------------------------------------------- models
def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act] if act is not None else []))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1-conv shortcut, add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU()), conv_bn(cout, cout, 3))
        self.short = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


class ResNetStyle(nn.Module):
    """ResNet-18 layout: 7x7/2 stem, max-pool, stages of basic blocks at widths 64..512, pool, FC."""

    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 7, 2, act=nn.ReLU()), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6())] if expand != 1 else []
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
            conv_bn(hidden, cout, 1),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


# (expand t, channels c, repeats n, stride s) of MobileNetV2 at width 1.0
MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


class MobileNetV2Style(nn.Module):
    """MobileNetV2 layout at width 1.0: 3x3/2 stem at 32, 17 inverted residuals, 1x1 to 1280, pool, FC."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.ReLU6())]
        cin = 32
        for t, c, n, s in MBV2_SETTINGS:
            for j in range(n):
                layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 1280, 1, act=nn.ReLU6()))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


# (output channels, stride) of MobileNet (v1) at width 1.0: one depthwise-separable block each
MBV1_SETTINGS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5, (1024, 2),
                 (1024, 1))  # fmt: skip


class MobileNetV1Style(nn.Module):
    """MobileNet (v1) layout at width 1.0: 3x3/2 stem at 32, 13 depthwise-separable blocks (3x3 depthwise,
    1x1 pointwise, BN + ReLU after each) up to 1024 channels, pool, FC. No residuals: every space is local."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, 32, 3, 2, act=nn.ReLU())]
        cin = 32
        for cout, stride in MBV1_SETTINGS:
            layers += [
                conv_bn(cin, cin, 3, stride, groups=cin, act=nn.ReLU()),
                conv_bn(cin, cout, 1, act=nn.ReLU()),
            ]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


MODELS = {"resnet18": ResNetStyle, "mobilenetv1": MobileNetV1Style, "mobilenetv2": MobileNetV2Style}


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BatchNorm statistics (as after training, not the identity init); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def zero_groups(model: nn.Module, x: torch.Tensor, fraction: float, jitter: float, seed: int) -> int:
    """Zero about `fraction` of each space's removable groups; with `jitter`, a per-space fraction in
    [fraction - jitter, fraction + jitter] (as a sparse-training method leaves uneven widths)."""
    if jitter <= 0:
        return zero_random_groups(model, (x,), fraction=fraction, seed=seed)
    found = find_groups(model, (x,))
    rng = np.random.default_rng(seed)
    zeroed = 0
    for indices in found.by_space.values():
        f = rng.uniform(fraction - jitter, fraction + jitter)
        k = min(int(round(f * len(indices))), len(indices) - 1)
        for i in rng.choice(indices, size=k, replace=False):
            zero_group(model, found.groups[int(i)])
            zeroed += 1
    return zeroed


# ------------------------------------------------------------------------------------------ pipeline
@dataclass
class Variant:
    name: str  # dense | slim | aligned-<m>
    model: nn.Module
    flops: int
    channels: int  # total channels over all slimmable spaces
    paths: dict[str, Path]  # runtime -> exported file


@dataclass
class Row:
    model: str
    runtime: str
    variant: str
    multiple: int | None
    favoured: bool
    channels: str  # kept / dense, summed over the model's channel spaces
    flops_ratio: float
    dense_ms: float
    slim_ms: float
    speedup: Speedup
    best_speedup: float  # min(dense) / min(slim): the least disturbed runs, robust on a busy host
    layout: str = "-"  # onnxruntime: convs on NCHWc kernels / all convs, after its graph optimisation


def channels_total(result) -> tuple[int, int]:
    spaces = result.report.spaces
    return sum(s.channels_before for s in spaces), sum(s.channels_after for s in spaces)


def export(model: nn.Module, x: torch.Tensor, stem: Path, runtimes: list[str]) -> dict[str, Path]:
    paths = {}
    for rt in runtimes:
        path = stem.with_suffix("." + FORMATS[rt])
        if FORMATS[rt] == "onnx":
            export_onnx(model, (x,), path, dynamic_batch=False)
        elif FORMATS[rt] == "pte":
            export_executorch(model, (x,), path, dynamic_batch=False)
        else:
            export_tflite(model, (x,), path)
        paths[rt] = path
    return paths


def build_variants(
    name: str,
    res: int,
    zeroing: tuple[float, float, int],
    multiples: dict[str, int],
    runtimes: list[str],
    workdir: Path,
) -> list[Variant]:
    """dense, slim and one aligned-slim per distinct multiple, each exported for the runtimes that use it."""
    fraction, jitter, seed = zeroing
    torch.manual_seed(seed)
    model = randomize(MODELS[name](), seed)
    x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(seed))
    zeroed = zero_groups(model, x, fraction, jitter, seed)
    t0 = time.perf_counter()
    plain = slim(model, (x,))
    before, after = channels_total(plain)
    log.info(
        "%s: zeroed %d channels; slim %d -> %d channels, FLOPs %.3g -> %.3g (%.2fx) in %.1fs",
        *(name, zeroed, before, after, plain.flops_before, plain.flops_after, plain.flops_ratio),
        time.perf_counter() - t0,
    )
    dense_paths = export(model, x, workdir / f"{name}_dense", runtimes)
    slim_paths = export(plain.model, x, workdir / f"{name}_slim", runtimes)
    variants = [
        Variant("dense", model, plain.flops_before, before, dense_paths),
        Variant("slim", plain.model, plain.flops_after, after, slim_paths),
    ]
    for m in sorted(set(multiples.values())):
        users = [rt for rt in runtimes if multiples[rt] == m]
        aligned = slim(model, (x,), channel_multiple=m)
        _, kept = channels_total(aligned)
        paths = export(aligned.model, x, workdir / f"{name}_aligned{m}", users)
        variants.append(Variant(f"aligned-{m}", aligned.model, aligned.flops_after, kept, paths))
    return variants


def time_variants(name: str, variants: list[Variant], runtime: str, multiple: int, favoured: bool,
                  target: Target, res: int, warmup: int, runs: int) -> list[Row]:  # fmt: skip
    """dense, slim, aligned interleaved in one process on the target; one Row per slim variant."""
    chosen = [v for v in variants if v.name in ("dense", "slim", f"aligned-{multiple}")]
    x = np.random.default_rng(0).standard_normal((1, 3, res, res)).astype(np.float32)
    t = target.with_overrides(runtime=runtime)
    run = run_on_target(t, [v.paths[runtime] for v in chosen], [x], warmup=warmup, runs=runs)
    lat = [np.asarray(e["latencies_ms"]) for e in run.result["models"]]
    rows = []
    for v, ratios, ms in zip(chosen[1:], run.result["pair_ratios"], lat[1:], strict=True):
        sp = speedup_from_ratios(ratios, "dense", v.name, target.name, (chosen[0].flops, v.flops))
        m = multiple if v.name.startswith("aligned") else None
        best = float(lat[0].min() / ms.min())
        dense_ms, slim_ms = float(np.median(lat[0])), float(np.median(ms))
        channels = f"{v.channels}/{chosen[0].channels}"
        row = Row(
            name, runtime, v.name, m, favoured, channels, sp.flops_ratio or 0.0, dense_ms, slim_ms, sp, best
        )
        if runtime == "onnxruntime":
            row.layout = ort_layout(v.paths[runtime])
        rows.append(row)
    return rows


def ort_layout(path: Path) -> str:
    """How many convs onnxruntime runs on its blocked NCHWc kernels after graph optimisation.

    onnxruntime rewrites a conv into the NCHWc layout only when its channel counts suit the block
    size; the others run as plain NCHW convs (im2col + GEMM, or a slow direct depthwise loop).
    """
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        nodes = onnx.load(opts.optimized_model_filepath).graph.node
    convs = [n for n in nodes if n.op_type in ("Conv", "FusedConv")]
    blocked = sum(1 for n in convs if n.domain == "com.microsoft.nchwc")
    return f"{blocked}/{len(convs)}"


def conv_kind(node) -> str:
    """'dwconv', 'conv1x1', 'conv3x3' ... for a conv of an optimised onnxruntime graph, suffixed ' NCHW'
    when onnxruntime left it off its blocked NCHWc kernels; other nodes: their op type."""
    if node.op_type not in ("Conv", "FusedConv"):
        return node.op_type
    attrs = {a.name: a for a in node.attribute}
    k = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
    kind = f"conv{k[0]}x{k[1]}" if len(k) == 2 else "conv"
    if "group" in attrs and attrs["group"].i > 1:
        kind = "dwconv"
    return kind if node.domain == "com.microsoft.nchwc" else kind + " NCHW"


@dataclass
class KernelTimes:
    """One model's onnxruntime profile: kernel us per op kind, and us and FLOPs per output size."""

    by_kind: dict[str, float]
    by_size: dict[str, list[float]]  # "56x56" (conv output) or "FC" -> [us, FLOPs]


def node_flops(args: dict) -> tuple[str, float] | None:
    """(output size, FLOPs) of a profiled Conv or Gemm node from the shapes onnxruntime records."""
    shapes = [next(iter(t.values())) for t in args.get("input_type_shape", [])]
    out = [next(iter(t.values())) for t in args.get("output_type_shape", [])]
    if args.get("op_name") == "Conv" and len(shapes) >= 2 and out and len(out[0]) >= 4:
        w, (h, wd) = shapes[1], out[0][2:4]
        return f"{h}x{wd}", 2.0 * math.prod(w) * h * wd
    if args.get("op_name") in ("Gemm", "MatMul") and len(shapes) >= 2:
        return "FC", 2.0 * math.prod(shapes[0]) * shapes[1][0]
    return None


def ort_kernel_times(paths: list[Path], x: np.ndarray, runs: int) -> list[KernelTimes]:
    """onnxruntime's own per-node kernel time (median over runs, in us), summed per conv kind / op type
    and per output size (with the FLOPs of the convs and FC there).

    One profiling session per model, run interleaved (one run of each per round, like the timing), so
    host load drifts hit every model alike. In this process, 1 thread (pinned by the caller).
    """
    import json

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        sessions, kinds = [], []
        for k, path in enumerate(paths):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
            opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / f"prof{k}")
            opts.optimized_model_filepath = str(Path(tmp) / f"opt{k}.onnx")
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
            kinds.append({n.name: conv_kind(n) for n in onnx.load(opts.optimized_model_filepath).graph.node})
        for _ in range(runs):
            for session in sessions:
                session.run(None, {session.get_inputs()[0].name: x})
        events = [json.loads(Path(session.end_profiling()).read_text()) for session in sessions]
    out = []
    for model_events, model_kinds in zip(events, kinds, strict=True):
        per_node: dict[str, list[float]] = {}
        node_args: dict[str, dict] = {}
        for e in model_events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                node = e["name"].removesuffix("_kernel_time")
                per_node.setdefault(node, []).append(float(e["dur"]))
                node_args.setdefault(node, e.get("args", {}))
        times = KernelTimes({}, {})
        for node, durations in per_node.items():
            kind, us = model_kinds.get(node, "?"), float(np.median(durations))
            times.by_kind[kind] = times.by_kind.get(kind, 0.0) + us
            sized = node_flops(node_args[node])
            if sized is not None:
                cell = times.by_size.setdefault(sized[0], [0.0, 0.0])
                cell[0] += us
                cell[1] += sized[1]
        out.append(times)
    return out


def ort_profile(name: str, variants: list[Variant], multiple: int, target: Target, res: int, runs: int):
    """Per op kind: kernel time dense vs slim vs aligned-slim on onnxruntime (where the time goes)."""
    chosen = [v for v in variants if v.name in ("dense", "slim", f"aligned-{multiple}")]
    x = np.random.default_rng(0).standard_normal((1, 3, res, res)).astype(np.float32)
    saved = os.sched_getaffinity(0)
    try:
        if target.affinity:
            os.sched_setaffinity(0, set(target.affinity))
        times = ort_kernel_times([v.paths["onnxruntime"] for v in chosen], x, runs)
    finally:
        os.sched_setaffinity(0, saved)
    return name, [v.name for v in chosen], times


def profile_table(profiles) -> list[str]:
    out = ["| model | op kind | " + " | ".join(f"{n} us (share)" for n in profiles[0][1]) + " | speedups |"]
    out.append("|---" * (3 + len(profiles[0][1])) + "|")
    for name, _, model_times in profiles:
        times = [t.by_kind for t in model_times]
        kinds = sorted(set().union(*times), key=lambda k: -times[0].get(k, 0.0))
        for kind in [*kinds, "total"]:
            vals = [sum(t.values()) if kind == "total" else t.get(kind, 0.0) for t in times]
            totals = [sum(t.values()) for t in times]
            cells = [f"{v:.0f} ({v / max(tot, 1e-9):.0%})" for v, tot in zip(vals, totals, strict=True)]
            ups = " / ".join(f"{vals[0] / v:.2f}x" if v and vals[0] else "-" for v in vals[1:])
            out.append(f"| {name} | {kind} | {' | '.join(cells)} | {ups} |")
    return out


def size_table(profiles) -> list[str]:
    """Convs and FC per output size: dense vs the last (aligned) variant, time and FLOPs ratios and the
    throughput each reaches (GFLOP/s): where the FLOPs cut turns into time and where it does not."""
    last = profiles[0][1][-1]
    out = [f"| model | output size | dense us | {last} us | time ratio | FLOPs ratio | dense GFLOP/s "
           f"| {last} GFLOP/s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, _, model_times in profiles:
        dense, slim_ = model_times[0].by_size, model_times[-1].by_size
        sizes = sorted(dense, key=lambda k: -dense[k][0])
        for size in [*sizes, "all"]:
            (du, df), (su, sf) = (
                ([sum(c[i] for c in d.values()) for i in (0, 1)] for d in (dense, slim_))
                if size == "all"
                else (dense[size], slim_.get(size, [0.0, 0.0]))
            )
            if not (du and su and df and sf):
                continue
            out.append(f"| {name} | {size} | {du:.0f} | {su:.0f} | {du / su:.2f} | {df / sf:.2f} "
                       f"| {df / du / 1e3:.0f} | {sf / su / 1e3:.0f} |")  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- output
def speedup_table(rows: list[Row]) -> list[str]:
    head = (
        "| model | runtime | variant | channels kept | FLOPs ratio | dense p50 ms | slim p50 ms "
        "| speedup median (p10-p90) | efficiency | >= 0.85 | best-run speedup | ORT NCHWc convs |"
    )
    out = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        s = r.speedup
        label = r.variant + ("" if r.multiple is None or r.favoured else " (not favoured)")
        ok = "yes" if (s.efficiency or 0) >= TARGET_EFFICIENCY else "no"
        out.append(
            f"| {r.model} | {r.runtime} | {label} | {r.channels} | {r.flops_ratio:.2f}x "
            f"| {r.dense_ms:.2f} | {r.slim_ms:.2f}"
            f" | {s.median:.2f}x ({s.p10:.2f}-{s.p90:.2f}) | {s.efficiency:.2f} | {ok} "
            f"| {r.best_speedup:.2f}x | {r.layout} |"
        )
    return out


def alignment_table(rows: list[Row]) -> list[str]:
    """Plain vs aligned side by side, from the same interleaved run."""
    out = ["| model | runtime | multiple | FLOPs ratio plain / aligned | speedup plain / aligned "
           "| efficiency plain / aligned | aligned latency vs plain | pays? |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_key: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        by_key.setdefault((r.model, r.runtime), {})["aligned" if r.multiple else "slim"] = r
    for (model, rt), pair in by_key.items():
        p, a = pair.get("slim"), pair.get("aligned")
        if p is None or a is None:
            continue
        lat = a.slim_ms / p.slim_ms
        faster, slower = a.speedup.median > p.speedup.median * 1.02, a.speedup.median < p.speedup.median
        pays = "yes" if faster and lat < 1 else "no" if slower and lat >= 1 else "unclear (noise)"
        tag = "" if a.favoured else " (not favoured)"
        out.append(f"| {model} | {rt} | {a.multiple}{tag} | {p.flops_ratio:.2f}x / {a.flops_ratio:.2f}x | "
                   f"{p.speedup.median:.2f}x / {a.speedup.median:.2f}x | {p.speedup.efficiency:.2f} / "
                   f"{a.speedup.efficiency:.2f} | {lat:.3f} | {pays} |")  # fmt: skip
    return out


def alignment_lines(
    results: dict[str, dict[str, AlignmentResult]], used: dict[tuple[str, str], int]
) -> list[str]:
    out = ["| runtime | op kind | swept at | favoured multiple | roundup / step per candidate multiple |",
           "|---|---|---|---|---|"]  # fmt: skip
    for rt, kinds in results.items():
        for kind, res in kinds.items():
            scores = ", ".join(f"{m}: {s['roundup']:.3f} / {s['step']:.3f}" for m, s in res.scores.items())
            where = f"{res.channels[0]}..{res.channels[-1]} ch, {SWEEP_SPATIAL[kind]}x{SWEEP_SPATIAL[kind]}"
            out.append(f"| {rt} | {kind} | {where} | {res.multiple if res.multiple else 'none'} | {scores} |")
    title = "Multiple used per model (largest favoured multiple over the op kinds the model contains):"
    out += ["", title, "", "| model | op kinds | " + " | ".join(results) + " |",
            "|---|---|" + "---|" * len(results)]  # fmt: skip
    for name in dict.fromkeys(m for m, _ in used):
        cells = " | ".join(str(used.get((name, rt), "-")) for rt in results)
        out.append(f"| {name} | {', '.join(MODEL_KINDS[name])} | {cells} |")
    return out


# --------------------------------------------------------------------------------------------- main
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_multiples(spec: str | None) -> dict[str, int]:
    if not spec:
        return {}
    pairs = (item.split("=", 1) for item in spec.split(",") if item)
    return {rt.strip(): int(m) for rt, m in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="112x112 inputs, fewer runs, short alignment sweep"
    )
    parser.add_argument("--target", default="mobile-1t", choices=sorted(BUILTIN_TARGETS))
    parser.add_argument("--models", default="resnet18,mobilenetv1,mobilenetv2")
    parser.add_argument("--runtimes", default="onnxruntime,litert,executorch")
    parser.add_argument("--fraction", type=float, default=0.5, help="share of each space's groups zeroed")
    parser.add_argument("--jitter", type=float, default=0.1, help="per-space fraction in fraction +- jitter")
    parser.add_argument("--res", type=int, default=None, help="input size (default 224, --quick 112)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved rounds (default 60, --quick 20)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--multiple", default=None, help="skip the sweep: runtime=m,... (e.g. litert=8)")
    parser.add_argument("--fallback-multiple", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ort-profile", action="store_true", help="also: onnxruntime kernel time per op kind, dense vs slim"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the tables as Markdown here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    res = args.res or (112 if args.quick else 224)
    runs = args.runs or (20 if args.quick else 60)
    runtimes = [r for r in args.runtimes.split(",") if r]
    target: Target = get_target(args.target)
    started = time.perf_counter()

    # 1. which multiple each runtime's kernels favour per op kind, measured on the target
    forced = parse_multiples(args.multiple)
    sweep = QUICK_SWEEP if args.quick else range(24, 65)
    model_names = [m for m in args.models.split(",") if m]
    kinds = tuple(dict.fromkeys(k for name in model_names for k in MODEL_KINDS[name]))
    align_results: dict[str, dict[str, AlignmentResult]] = {}
    for rt in runtimes:
        if rt in forced:
            continue
        t0 = time.perf_counter()
        align_results[rt] = measure_alignment_kinds(
            target.with_overrides(runtime=rt), kinds, spatial=SWEEP_SPATIAL, channels=sweep, fmt=FORMATS[rt],
            runs=15 if args.quick else 30,
        )  # fmt: skip
        found = {k: r.multiple for k, r in align_results[rt].items()}
        log.info("alignment %s: favoured multiples %s (%.0fs)", rt, found, time.perf_counter() - t0)
    used: dict[tuple[str, str], int] = {}

    def model_multiples(name: str) -> tuple[dict[str, int], dict[str, bool]]:
        multiples, favoured = {}, {}
        for rt in runtimes:
            m = forced.get(rt) or multiple_for_kinds(align_results.get(rt, {}), MODEL_KINDS[name])
            multiples[rt], favoured[rt] = (m, True) if m else (args.fallback_multiple, False)
            used[(name, rt)] = multiples[rt]
        return multiples, favoured

    # 2. variants, export, interleaved timing
    rows: list[Row] = []
    profiles = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-slim-") as tmp:
        for name in model_names:
            multiples, favoured = model_multiples(name)
            t0 = time.perf_counter()
            zeroing = (args.fraction, args.jitter, args.seed)
            variants = build_variants(name, res, zeroing, multiples, runtimes, Path(tmp))
            log.info("%s: built and exported %d variants in %.0fs", name, len(variants),
                         time.perf_counter() - t0)  # fmt: skip
            for rt in runtimes:
                rows += time_variants(name, variants, rt, multiples[rt], favoured[rt], target, res,
                                      args.warmup, runs)  # fmt: skip
                loads.append(os.getloadavg()[0])
                log.info("%s on %s: timed (1-min load average %.1f)", name, rt, loads[-1])
            if args.ort_profile and "onnxruntime" in runtimes:
                profiles.append(ort_profile(name, variants, multiples["onnxruntime"], target, res, runs))

    header = [
        f"target {target.name} (threads={target.threads}, affinity={list(target.affinity)}), "
        f"input 1x3x{res}x{res}, fp32, {args.fraction:.0%} +- {args.jitter:.0%} of each space's channel "
        f"groups zeroed (seed {args.seed}), {runs} interleaved rounds",
        f"host: {cpu_model()}, {os.cpu_count()} cores, python {sys.version.split()[0]}, "
        f"onnxruntime {version('onnxruntime')}, ai-edge-litert {version('ai-edge-litert')}, "
        f"litert-torch {version('litert-torch')}, executorch {version('executorch')}, "
        f"torch {torch.__version__}",
        f"1-min load average after each timing: {', '.join(f'{v:.1f}' for v in loads)} "
        "(other processes share the cores; the speedups are per-round ratios, p10-p90 shows the spread)",
    ]
    lines = [*header, "", "Speedup over dense (median of per-round ratios dense/slim):", "",
             *speedup_table(rows), "",
             "Channel alignment, measured favoured multiple per runtime and op kind:", "",
             *(alignment_lines(align_results, used) if align_results else [f"forced: {forced}"]), "",
             "Plain vs aligned slimming (same interleaved run):", "", *alignment_table(rows), "",
             *(["onnxruntime kernel time per op kind (its profiler, median per node, summed, sessions run "
                 "interleaved; speedups dense/slim and dense/aligned):", "", *profile_table(profiles), "",
                 "onnxruntime convs and FC per output size, dense vs aligned (same profile; FLOPs from the "
                 "shapes it records):", "", *size_table(profiles), ""]
               if profiles else []),
             f"total time {time.perf_counter() - started:.0f}s"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
