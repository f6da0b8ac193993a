"""Channel alignment, measured: which channel multiple do a target's kernels favour, per op kind?

Tiny one-layer models are built for a sweep of output channel counts and timed on the target in one
interleaved run. The op kinds (`LAYER_KINDS`) are the ones channel spaces go through: a 3x3 conv
("conv"), a pointwise 1x1 conv ("conv1x1"), a depthwise 3x3 conv ("dwconv", whose input and output
channels are both the swept count) and a linear layer ("linear"). Kernels that work in blocks of m
channels show a staircase: latency is flat inside a block and jumps past each multiple of m. A
multiple is favoured when (a) rounding the counts up to it costs no more than rounding to any other
candidate (mean latency after rounding within cost_tol of the best; it can be below 1 when unaligned
counts fall off a fast path) and (b) crossing it costs (median latency(b+1)/latency(b) above 1 + tol,
and above the step at the smaller candidate's multiples that m skips).
The favoured multiple is the largest such m, or None when latency shows no such staircase (alignment buys
nothing there, so slimming should keep exactly what it can). The favoured multiple may differ per op
kind; `measure_alignment_kinds` sweeps several and `multiple_for_kinds` combines them for a space.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimship.runtimes.execute import run_on_target
from slimship.runtimes.targets import Target

log = logging.getLogger(__name__)
CANDIDATE_MULTIPLES = (16, 8, 4, 2)
LAYER_KINDS = ("conv", "conv1x1", "dwconv", "linear")
# output size each kind is swept at: a depthwise conv does about 1/C of a full conv's work, so it is
# swept larger to stay measurable
SWEEP_SPATIAL = {"conv": 28, "conv1x1": 28, "dwconv": 56, "linear": 28}


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
    cost_tol: float = 0.01,
) -> tuple[int | None, dict[int, dict[str, float]]]:
    """Largest multiple m whose round-up is (nearly) the cheapest and whose block boundaries cost.

    roundup: mean latency when every swept count c is rounded up to m, over the mean latency of the
    counts as they are (the same counts for every m). 1.0: the padding is free; below 1: unaligned
    counts fall off a fast path (so rounding up is faster). m qualifies when its roundup is within
    cost_tol (about the sweep's noise) of the best one (and of 1.0), so a larger multiple is chosen only
    when it costs no more than a smaller one (a kernel that pads to 4 and blocks by 8 gets 8, not 16).
    The bar is tight because in a network a rounded space pads its producer's outputs and its consumers'
    inputs, so a layer's round-up cost counts about twice (onnxruntime 1x1 convs: 16 at 1.3-4% over 8
    per layer made whole models 5-7% slower than 8). step: median over
    multiples b of latency(b + 1) / latency(b); it must exceed 1 + tol (crossing a multiple costs),
    otherwise latency has no staircase at m and aligning to it buys nothing. It must also exceed the
    step at the multiples of the next smaller candidate that m skips (tol again): blocks of 8 make
    every multiple of 16 a step too, but 16 is not a period of their staircase.
    """
    lat = dict(zip(channels, latencies, strict=True))
    order = sorted(set(candidates), reverse=True)
    steps = {m: [lat[b + 1] / lat[b] for b in channels if b % m == 0 and b + 1 in lat] for m in order}
    scored = [m for m, s in steps.items() if s]
    while scored:  # counts whose round-up to every scored multiple was swept; drop m too large for that
        counts = [c for c in channels if all(math.ceil(c / m) * m in lat for m in scored)]
        if counts:
            break
        scored.pop(0)
    scores: dict[int, dict[str, float]] = {}
    if scored:
        base = float(np.mean([lat[c] for c in counts]))
        for m in scored:
            roundup = float(np.mean([lat[math.ceil(c / m) * m] for c in counts])) / base
            scores[m] = {"roundup": roundup, "step": float(np.median(steps[m]))}
    best = min([1.0, *(s["roundup"] for s in scores.values())])

    def own_staircase(m: int) -> bool:
        """False when crossing the multiples of a smaller candidate that are not multiples of m costs as
        much as crossing m's: the staircase then has the smaller period and m only looks like a step."""
        smaller = [d for d in scored if d < m and m % d == 0]
        if not smaller:
            return True
        d = max(smaller)
        off = [lat[b + 1] / lat[b] for b in channels if b % d == 0 and b % m and b + 1 in lat]
        return not off or scores[m]["step"] > float(np.median(off)) * (1.0 + tol)

    favoured = next(
        (
            m
            for m, s in scores.items()
            if s["roundup"] <= best * (1.0 + cost_tol) and s["step"] > 1.0 + tol and own_staircase(m)
        ),
        None,
    )
    return favoured, scores


def _check_kind(op: str) -> None:
    if op not in LAYER_KINDS:
        raise ValueError(f"op must be one of {LAYER_KINDS}, got {op!r}")


def layer_input_shape(op: str, in_channels: int, spatial: int) -> tuple[int, ...]:
    """Input shape of the one-layer model for `op` (a depthwise model slices its channels from it)."""
    _check_kind(op)
    return (spatial, in_channels) if op == "linear" else (1, in_channels, spatial, spatial)


def build_layer_onnx(
    path: Path, op: str, in_channels: int, out_channels: int, spatial: int, seed: int = 0
) -> Path:
    """Write a one-layer ONNX model with random weights: see LAYER_KINDS.

    conv / conv1x1: 3x3 (padded) / 1x1 Conv, in_channels -> out_channels (NCHW). dwconv: the first
    out_channels of the input (Slice, so one input shape serves the whole sweep), then a depthwise
    3x3 Conv over them; in_channels must be >= out_channels. linear: MatMul + Add.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _check_kind(op)
    rng = np.random.default_rng(seed)
    x_shape = list(layer_input_shape(op, in_channels, spatial))
    y_shape = [spatial, out_channels] if op == "linear" else [1, out_channels, spatial, spatial]
    extra = []
    if op in ("conv", "conv1x1"):
        k = 3 if op == "conv" else 1
        w = rng.standard_normal((out_channels, in_channels, k, k)).astype(np.float32)
        pads = [k // 2] * 4
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=pads, kernel_shape=[k, k])]
    elif op == "dwconv":
        if out_channels > in_channels:
            raise ValueError(f"dwconv slices {out_channels} channels from an input of {in_channels}")
        w = rng.standard_normal((out_channels, 1, 3, 3)).astype(np.float32)
        bounds = [("starts", [0]), ("ends", [out_channels]), ("axes", [1])]
        extra = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in bounds]
        nodes = [
            helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["xs"]),
            helper.make_node(
                "Conv", ["xs", "w", "b"], ["y"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], group=out_channels
            ),
        ]
    else:
        w = rng.standard_normal((in_channels, out_channels)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    b = rng.standard_normal(out_channels).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        f"{op}_{out_channels}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), *extra],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _slice_depthwise(channels: int):
    """The dwconv one-layer torch module: the input's first `channels` channels, depthwise 3x3."""
    import torch

    class SliceDepthwise(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x[:, :channels])

    return SliceDepthwise()


def _torch_layer(op: str, in_channels: int, out_channels: int, spatial: int, seed: int):
    """The one-layer torch module of `op` and its input (see LAYER_KINDS)."""
    import torch

    _check_kind(op)
    torch.manual_seed(seed)
    x = torch.randn(*layer_input_shape(op, in_channels, spatial))
    if op in ("conv", "conv1x1"):
        k = 3 if op == "conv" else 1
        layer = torch.nn.Conv2d(in_channels, out_channels, k, padding=k // 2)
    elif op == "dwconv":
        if out_channels > in_channels:
            raise ValueError(f"dwconv slices {out_channels} channels from an input of {in_channels}")
        layer = _slice_depthwise(out_channels)
    else:
        layer = torch.nn.Linear(in_channels, out_channels)
    return layer.eval(), x


def build_layer_tflite(
    path: Path, op: str, in_channels: int, out_channels: int, spatial: int, seed: int = 0
) -> Path:
    """Write a one-layer TFLite model through litert_torch (slower to build than ONNX); see LAYER_KINDS."""
    import litert_torch

    layer, x = _torch_layer(op, in_channels, out_channels, spatial, seed)
    litert_torch.convert(layer, (x,)).export(str(path))
    return path


def build_layer_pte(
    path: Path, op: str, in_channels: int, out_channels: int, spatial: int, seed: int = 0
) -> Path:
    """Write a one-layer ExecuTorch program (XNNPACK delegate, fixed shape); see LAYER_KINDS."""
    from slimship.exporters.executorch_export import lower_to_bytes

    layer, x = _torch_layer(op, in_channels, out_channels, spatial, seed)
    path.write_bytes(lower_to_bytes(layer, (x,)))
    return path


def measure_alignment(
    target: Target,
    *,
    op: str = "conv",
    channels: Iterable[int] = range(24, 65),
    in_channels: int | None = None,
    spatial: int = 28,
    fmt: str = "onnx",
    warmup: int = 3,
    runs: int = 30,
    tol: float = 0.03,
    workdir: Path | None = None,
) -> AlignmentResult:
    """Time one-layer models over `channels` on `target` (interleaved, one process); derive the multiple.

    in_channels defaults to 32 (for dwconv: the largest swept count, which the layer slices from).
    """
    _check_kind(op)
    channels = sorted(set(channels))
    if in_channels is None:
        in_channels = max(channels) if op == "dwconv" else 32
    build = {"onnx": build_layer_onnx, "tflite": build_layer_tflite, "pte": build_layer_pte}.get(fmt)
    if build is None:
        raise ValueError(f"fmt must be 'onnx', 'tflite' or 'pte', got {fmt!r}")
    with tempfile.TemporaryDirectory(prefix="slimship-align-", dir=workdir) as tmp:
        paths = [build(Path(tmp) / f"{op}_{c}.{fmt}", op, in_channels, c, spatial) for c in channels]
        x = np.random.default_rng(0).standard_normal(layer_input_shape(op, in_channels, spatial))
        run = run_on_target(target, paths, [x.astype(np.float32)], warmup=warmup, runs=runs)
    p50 = [float(np.median(e["latencies_ms"])) for e in run.result["models"]]
    multiple, scores = derive_multiple(channels, p50, tol=tol)
    log.info("target %s, %s %s: favoured multiple %s (scores %s)", target.name, op, fmt, multiple, scores)
    return AlignmentResult(target.name, op, fmt, channels, p50, scores, multiple, tol)


def measure_alignment_kinds(
    target: Target,
    kinds: Iterable[str] = ("conv", "conv1x1", "dwconv"),
    *,
    spatial: dict[str, int] | None = None,
    **kwargs,
) -> dict[str, AlignmentResult]:
    """measure_alignment for each op kind (one interleaved run per kind) at `spatial` per kind
    (default SWEEP_SPATIAL)."""
    spatial = SWEEP_SPATIAL if spatial is None else spatial
    out = {}
    for kind in kinds:
        extra = {"spatial": spatial[kind]} if kind in spatial else {}
        out[kind] = measure_alignment(target, op=kind, **kwargs, **extra)
    return out


def multiple_for_kinds(results: dict[str, AlignmentResult], kinds: Iterable[str]) -> int | None:
    """The multiple a channel space touching ops of `kinds` should be rounded to: the largest favoured
    multiple among those kinds (candidates are powers of two, so it is a multiple of every other one);
    kinds without a measurement are ignored; None when none of them favours alignment."""
    favoured = [results[k].multiple for k in kinds if k in results and results[k].multiple]
    return max(favoured) if favoured else None


def op_kinds(model: Any, example_inputs: tuple[Any, ...]) -> tuple[str, ...]:
    """The LAYER_KINDS among `model`'s 2-D convs and linear layers, read from its torch.export graph."""
    import torch

    aten = torch.ops.aten
    program = torch.export.export(model, tuple(example_inputs), strict=False)
    found = set()
    for node in program.graph.nodes:
        if node.target is aten.linear.default:
            found.add("linear")
        elif node.target is aten.conv2d.default:
            weight = node.args[1].meta["val"]
            groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
            if groups > 1 and weight.shape[1] == 1:
                found.add("dwconv")
            else:
                found.add("conv1x1" if tuple(weight.shape[2:]) == (1, 1) else "conv")
    return tuple(k for k in LAYER_KINDS if k in found)


def sweep_format(runtime: str) -> str:
    """The one-layer model format a runtime's sweep uses: the suffix of its first file kind."""
    from slimship.runtimes.registry import get_runtime

    return get_runtime("onnxruntime" if runtime == "auto" else runtime).suffixes[0].lstrip(".")


def favoured_multiple(
    model: Any, example_inputs: tuple[Any, ...], target: Target, **kwargs: Any
) -> tuple[int | None, dict[str, AlignmentResult]]:
    """Sweep the op kinds `model` contains on `target` and combine them: the `channel_multiple` to slim
    it with for that target (None: alignment does not pay there), and the sweep per kind. The one-layer
    models are in the format the target's runtime opens (ONNX for `auto`; `fmt` overrides)."""
    kwargs.setdefault("fmt", sweep_format(target.runtime))
    results = measure_alignment_kinds(target, op_kinds(model, example_inputs), **kwargs)
    return multiple_for_kinds(results, results), results
