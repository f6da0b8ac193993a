"""Channel alignment, measured: which channel multiple do a target's kernels favour?

Tiny one-layer models (a 3x3 conv or a linear layer) are built for a sweep of output channel
counts and timed on the target in one interleaved run. Kernels that work in blocks of m channels
show a staircase: latency is flat inside a block and jumps past each multiple of m. A multiple is
favoured when (a) rounding a count up to it costs nothing (mean latency(round_up)/latency(c)
within tol) and (b) crossing it costs (median latency(b+1)/latency(b) above 1 + tol). The favoured
multiple is the largest such m, or None when latency shows no such staircase (alignment buys
nothing there, so slimming should keep exactly what it can).
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slimship.runtimes.execute import run_on_target
from slimship.runtimes.targets import Target

log = logging.getLogger(__name__)
CANDIDATE_MULTIPLES = (16, 8, 4, 2)


@dataclass
class AlignmentResult:
    target: str
    op: str
    fmt: str
    channels: list[int]
    p50_ms: list[float]
    scores: dict[int, dict[str, float]]  # multiple -> {"roundup": ..., "step": ...}, see derive_multiple
    multiple: int | None  # the multiple the kernels favour, None if alignment does not pay
    tolerance: float


def round_channels_up(kept: int, multiple: int, total: int) -> int:
    """Round a kept-channel count up to a multiple, never beyond the layer's `total` channels."""
    if total < 0 or not 0 <= kept <= total:
        raise ValueError(f"kept={kept} must be within 0..total={total}")
    if multiple <= 1 or kept == 0:
        return kept
    return min(math.ceil(kept / multiple) * multiple, total)


def derive_multiple(
    channels: Sequence[int],
    latencies: Sequence[float],
    candidates: Iterable[int] = CANDIDATE_MULTIPLES,
    tol: float = 0.03,
) -> tuple[int | None, dict[int, dict[str, float]]]:
    """Largest multiple m whose round-up is free and whose block boundaries cost; scores for every m.

    roundup: mean over non-aligned c of latency(round_up(c, m)) / latency(c); <= 1 + tol means
    the extra channels up to the multiple cost nothing (a mean, so that a multiple spanning two
    real blocks, where half the round-ups cross a step, does not pass). step: median over multiples b of
    latency(b + 1) / latency(b); > 1 + tol means crossing a multiple costs. Both must hold.
    """
    lat = dict(zip(channels, latencies, strict=True))
    scores: dict[int, dict[str, float]] = {}
    for m in sorted(candidates, reverse=True):
        ups = [lat[math.ceil(c / m) * m] / lat[c] for c in channels if c % m and math.ceil(c / m) * m in lat]
        steps = [lat[b + 1] / lat[b] for b in channels if b % m == 0 and b + 1 in lat]
        if ups and steps:
            scores[m] = {"roundup": float(np.mean(ups)), "step": float(np.median(steps))}
    favoured = next(
        (m for m, s in scores.items() if s["roundup"] <= 1.0 + tol and s["step"] > 1.0 + tol), None
    )
    return favoured, scores


def build_layer_onnx(
    path: Path, op: str, in_channels: int, out_channels: int, spatial: int, seed: int = 0
) -> Path:
    """Write a one-layer ONNX model: 3x3 Conv (NCHW) or MatMul+Add (linear) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    if op == "conv":
        x_shape, y_shape = [1, in_channels, spatial, spatial], [1, out_channels, spatial, spatial]
        w = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])
        nodes = [node]
    elif op == "linear":
        x_shape, y_shape = [spatial, in_channels], [spatial, out_channels]
        w = rng.standard_normal((in_channels, out_channels)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    else:
        raise ValueError(f"op must be 'conv' or 'linear', got {op!r}")
    b = rng.standard_normal(out_channels).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        f"{op}_{out_channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_layer_tflite(
    path: Path, op: str, in_channels: int, out_channels: int, spatial: int, seed: int = 0
) -> Path:
    """Write a one-layer TFLite model through litert_torch (slower to build than ONNX)."""
    import litert_torch
    import torch

    torch.manual_seed(seed)
    if op == "conv":
        layer, x = (
            torch.nn.Conv2d(in_channels, out_channels, 3, padding=1),
            torch.randn(1, in_channels, spatial, spatial),
        )
    elif op == "linear":
        layer, x = torch.nn.Linear(in_channels, out_channels), torch.randn(spatial, in_channels)
    else:
        raise ValueError(f"op must be 'conv' or 'linear', got {op!r}")
    litert_torch.convert(layer.eval(), (x,)).export(str(path))
    return path


def measure_alignment(
    target: Target,
    *,
    op: str = "conv",
    channels: Iterable[int] = range(24, 65),
    in_channels: int = 32,
    spatial: int = 28,
    fmt: str = "onnx",
    warmup: int = 3,
    runs: int = 30,
    tol: float = 0.03,
    workdir: Path | None = None,
) -> AlignmentResult:
    """Time one-layer models over `channels` on `target` (interleaved, one process); derive the multiple."""
    channels = sorted(set(channels))
    build = {"onnx": build_layer_onnx, "tflite": build_layer_tflite}.get(fmt)
    if build is None:
        raise ValueError(f"fmt must be 'onnx' or 'tflite', got {fmt!r}")
    with tempfile.TemporaryDirectory(prefix="slimship-align-", dir=workdir) as tmp:
        paths = [build(Path(tmp) / f"{op}_{c}.{fmt}", op, in_channels, c, spatial) for c in channels]
        x_shape = (1, in_channels, spatial, spatial) if op == "conv" else (spatial, in_channels)
        x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
        run = run_on_target(target, paths, [x], warmup=warmup, runs=runs)
    p50 = [float(np.median(e["latencies_ms"])) for e in run.result["models"]]
    multiple, scores = derive_multiple(channels, p50, tol=tol)
    log.info("target %s, %s %s: favoured multiple %s (scores %s)", target.name, op, fmt, multiple, scores)
    return AlignmentResult(target.name, op, fmt, channels, p50, scores, multiple, tol)
