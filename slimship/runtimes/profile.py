"""Per-layer profiles: where the time goes, dense against slim, layer by layer.

onnxruntime: its own profiler (per-node kernel time, median over runs, both models' sessions run
interleaved so host load drifts hit both alike). A profiled node is attributed to the source model's
layer through its weight initializer, whose name is the PyTorch parameter name (`block.conv.weight`
-> layer `block.conv`), else through the module scope the torch exporter records on the node
(`pkg.torch.onnx.name_scopes`, kept by the decoder export); other nodes are summed per op type
("other: Relu"). FLOPs of convs and
matmuls come from the shapes onnxruntime records, so the FLOPs ratio is that of the kernels it ran.

ExecuTorch: its event tracer (ETDump, read with `executorch.devtools.Inspector`) times every XNNPACK
kernel ("Convolution (NHWC, F32) IGEMM #3"). Without an ETRecord these carry no module names, so a layer
is the kernel's kind and its position among kernels of that kind ("Convolution #3"): dense and slim
programs have the same kernels in the same order. FLOPs are not recorded there.

LiteRT: its Python interpreter exposes no per-operator timing; `profile_models` says so.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimship.errors import TargetError

POOR_EFFICIENCY = 0.7  # a layer whose speedup is under 70% of its FLOPs cut is marked ...
MIN_SHARE = 0.02  # ... when it takes at least 2% of the dense model's kernel time (else it is noise)
_PARAM_RE = re.compile(r"^(.+)\.(weight|bias)$")


@dataclasses.dataclass
class LayerTime:
    """One layer's kernel time dense vs slim (microseconds) and FLOPs."""

    layer: str
    op: str
    dense_us: float
    slim_us: float
    dense_flops: float
    slim_flops: float
    share: float = 0.0  # of the dense model's total kernel time

    @property
    def speedup(self) -> float | None:
        return self.dense_us / self.slim_us if self.slim_us > 0 else None

    @property
    def flops_ratio(self) -> float | None:
        return self.dense_flops / self.slim_flops if self.slim_flops > 0 and self.dense_flops > 0 else None

    @property
    def efficiency(self) -> float | None:
        if self.speedup is None or self.flops_ratio is None:
            return None
        return self.speedup / self.flops_ratio

    @property
    def poor(self) -> bool:
        if self.efficiency is None or self.flops_ratio is None or self.share < MIN_SHARE:
            return False
        return self.flops_ratio > 1.05 and self.efficiency < POOR_EFFICIENCY

    def as_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.update(
            dense_ms=self.dense_us / 1e3, slim_ms=self.slim_us / 1e3, speedup=self.speedup,
            flops_ratio=self.flops_ratio, efficiency=self.efficiency, poor=self.poor,
        )  # fmt: skip
        return row


@dataclasses.dataclass
class LayerProfile:
    """A per-layer comparison on one runtime; `note` says what could not be profiled and why."""

    runtime: str
    layers: list[LayerTime]
    runs: int
    note: str = ""

    def rows(self) -> list[dict[str, Any]]:
        return [layer.as_row() for layer in self.layers]


def profile_models(
    dense: str | Path, slim: str | Path, inputs: Sequence[np.ndarray], *, runs: int = 20, threads: int = 1,
    slim_inputs: Sequence[np.ndarray] | None = None,
) -> LayerProfile:  # fmt: skip
    """Per-layer dense vs slim profile of two files of the same format (onnxruntime, ExecuTorch).
    `slim_inputs`: the slim file's own inputs where they differ from the dense one's (a decoder's cache)."""
    suffix = Path(slim).suffix.lower()
    if Path(dense).suffix.lower() != suffix:
        raise TargetError(f"a per-layer profile compares files of one format: {dense} vs {slim}")
    both = (inputs, inputs if slim_inputs is None else slim_inputs)
    if suffix == ".onnx":
        return profile_onnx(dense, slim, both, runs=runs, threads=threads)
    if suffix == ".pte":
        return profile_executorch(dense, slim, both, runs=runs, threads=threads)
    return LayerProfile(
        "litert", [], runs,
        note="litert: its Python interpreter exposes no per-operator timing; profile the ONNX or "
        "ExecuTorch export for a per-layer view",
    )  # fmt: skip


Inputs = Sequence[np.ndarray] | tuple[Sequence[np.ndarray], Sequence[np.ndarray]]


def _per_model(inputs: Inputs) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]:
    """(dense inputs, slim inputs): one list for both, or a pair of lists."""
    if isinstance(inputs, tuple) and len(inputs) == 2 and not isinstance(inputs[0], np.ndarray):
        return inputs[0], inputs[1]
    return inputs, inputs  # type: ignore[return-value]


def profile_onnx(
    dense: str | Path, slim: str | Path, inputs: Inputs, *, runs: int = 20, threads: int = 1
) -> LayerProfile:
    """onnxruntime's per-node kernel times, attributed to layers, dense vs slim (see module doc).
    `inputs`: one list for both files, or a (dense, slim) pair of lists."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="slimship-profile-") as tmp:
        sessions, owners = [], []
        for k, path in enumerate((dense, slim)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, f"profile{k}")
            opts.optimized_model_filepath = os.path.join(tmp, f"optimized{k}.onnx")
            session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            sessions.append(session)
            owners.append(_layer_of_nodes(onnx.load(str(path)), onnx.load(opts.optimized_model_filepath)))
        feeds = [dict(zip([i.name for i in s.get_inputs()], x, strict=True))
                 for s, x in zip(sessions, _per_model(inputs), strict=True)]  # fmt: skip
        for _ in range(runs):
            for session, feed in zip(sessions, feeds, strict=True):
                session.run(None, feed)
        events = [json.loads(Path(s.end_profiling()).read_text()) for s in sessions]
    dense_t, slim_t = (_per_layer(e, o) for e, o in zip(events, owners, strict=True))
    zero = (0.0, 0.0)
    total = sum(us for us, _ in dense_t.values())
    layers = []
    for key in sorted(set(dense_t) | set(slim_t), key=lambda k: -dense_t.get(k, zero)[0]):
        (d_us, d_flops), (s_us, s_flops) = dense_t.get(key, zero), slim_t.get(key, zero)
        share = d_us / total if total > 0 else 0.0
        layers.append(LayerTime(key[0], key[1], d_us, s_us, d_flops, s_flops, share))
    return LayerProfile("onnxruntime", layers, runs)


def profile_executorch(
    dense: str | Path, slim: str | Path, inputs: Inputs, *, runs: int = 20, threads: int = 1
) -> LayerProfile:
    """ExecuTorch's per-kernel times from ETDump, dense vs slim, runs interleaved (see module doc).
    `inputs`: one list for both files, or a (dense, slim) pair of lists."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(threads)
    tensors = [[torch.from_numpy(np.ascontiguousarray(x)) for x in xs] for xs in _per_model(inputs)]
    modules = [portable_lib._load_for_executorch(str(p), enable_etdump=True) for p in (dense, slim)]
    for _ in range(runs):
        for module, feed in zip(modules, tensors, strict=True):
            module.forward(feed)
    per_model = []
    with tempfile.TemporaryDirectory(prefix="slimship-etdump-") as tmp:
        for k, module in enumerate(modules):
            path = os.path.join(tmp, f"model{k}.etdp")
            module.write_etdump_result_to_file(path)
            per_model.append(_kernel_times(Inspector(etdump_path=path)))
    dense_t, slim_t = per_model
    total = sum(dense_t.values())
    layers = [
        LayerTime(key, key.split(" #")[0], dense_t.get(key, 0.0), slim_t.get(key, 0.0), 0.0, 0.0,
                  dense_t.get(key, 0.0) / total if total else 0.0)
        for key in sorted(set(dense_t) | set(slim_t), key=lambda k: -dense_t.get(k, 0.0))
    ]  # fmt: skip
    return LayerProfile("executorch", layers, runs, note="FLOPs per kernel are not recorded by ETDump")


_ET_OVERHEAD = ("OPERATOR_CALL", "DELEGATE_CALL", "Method::execute")


def _kernel_times(inspector: Any) -> dict[str, float]:
    """ "Kind #n" -> median microseconds per run, for each XNNPACK kernel in execution order."""
    times: dict[str, float] = {}
    counts: dict[str, int] = {}
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.name in _ET_OVERHEAD or not event.perf_data:
                continue
            kind = event.name.split(" (")[0].split(" #")[0]
            counts[kind] = counts.get(kind, 0) + 1
            times[f"{kind} #{counts[kind]}"] = float(np.median(event.perf_data.raw)) * 1e3
    return times


def _layer_of_nodes(source: Any, optimized: Any) -> dict[str, tuple[str, str]]:
    """Optimized node name -> (layer, op type).

    A conv or matmul takes the layer of the source node it was made from, where onnxruntime kept that
    node's name (before a '/': `node_linear_1/MatMulAddFusion`); else the layer of the same-kind node at the
    same position in the source graph (onnxruntime's layout passes rename reordered or padded weights but
    keep the order of the kernels); where the counts differ, the node's own parameter names decide. A
    source node's layer is its weight initializer's name, the PyTorch parameter (`block.conv.weight` ->
    `block.conv`), else its module scope. Other nodes are summed per op type.
    """
    source_layers = {kind: [_node_layer(n, source) for n in _compute_nodes(source, kind)] for kind in _KINDS}
    by_name = {n.name: layer for kind in _KINDS for n in _compute_nodes(source, kind)
               if (layer := _node_layer(n, source))}  # fmt: skip
    owners = {node.name: (_param_layer(node, optimized) or f"other: {node.op_type}", node.op_type)
              for node in optimized.graph.node}  # fmt: skip
    for kind in _KINDS:
        nodes = _compute_nodes(optimized, kind)
        if len(nodes) == len(source_layers[kind]):
            for node, layer in zip(nodes, source_layers[kind], strict=True):
                if layer:
                    owners[node.name] = (layer, node.op_type)
        for node in nodes:
            layer = by_name.get(node.name.split("/")[0])
            if layer:
                owners[node.name] = (layer, node.op_type)
    return owners


_MATMULS = ("Gemm", "MatMul", "FusedMatMul", "FusedGemm", "MatMulNBits")
_KINDS = {"conv": ("Conv", "FusedConv"), "matmul": _MATMULS}
SCOPES_KEY = "pkg.torch.onnx.name_scopes"  # the torch exporter's module path of a node: ['', 'a', 'a.b', op]


def _compute_nodes(model: Any, kind: str) -> list[Any]:
    return [n for n in model.graph.node if n.op_type in _KINDS[kind]]


def _param_layer(node: Any, model: Any) -> str | None:
    initializers = {t.name for t in model.graph.initializer}
    params = [m[1] for i in node.input[1:] if i in initializers and (m := _PARAM_RE.match(i))]
    return params[0] if params else None


def _node_layer(node: Any, model: Any) -> str | None:
    """The layer of a compute node: its parameter's name (`a.b.weight` -> `a.b`), else its module scope."""
    layer = _param_layer(node, model)
    if layer is not None:
        return layer
    scopes = next((p.value for p in node.metadata_props if p.key == SCOPES_KEY), None)
    if scopes is None:
        return None
    try:
        names = [n for n in ast.literal_eval(scopes[:4096]) if isinstance(n, str) and n]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return names[-2] if len(names) >= 2 else None  # the innermost module (the last name is the op)


def _per_layer(
    events: list[dict[str, Any]], owners: dict[str, tuple[str, str]]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(layer, op) -> (median kernel us per run, FLOPs), summed over the nodes of the layer."""
    durations: dict[str, list[float]] = {}
    node_args: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            durations.setdefault(node, []).append(float(event.get("dur", 0.0)))
            node_args.setdefault(node, event.get("args", {}))
    totals: dict[tuple[str, str], tuple[float, float]] = {}
    for node, values in durations.items():
        layer, op = owners.get(node, (f"other: {node_args[node].get('op_name', '?')}", "?"))
        if layer.startswith("other: "):
            op = node_args[node].get("op_name", op)
            layer = f"other: {op}"
        us, flops = totals.get((layer, op), (0.0, 0.0))
        totals[(layer, op)] = (us + float(np.median(values)), flops + _node_flops(node_args[node]))
    return totals


def _node_flops(args: dict[str, Any]) -> float:
    """FLOPs of a Conv / Gemm / MatMul kernel from the shapes onnxruntime records (0 for other ops)."""
    shapes = [next(iter(t.values())) for t in args.get("input_type_shape", []) if t]
    outs = [next(iter(t.values())) for t in args.get("output_type_shape", []) if t]
    op = args.get("op_name", "")
    if "Conv" in op and len(shapes) >= 2 and outs and len(outs[0]) >= 3:
        spatial = outs[0][2:4] if len(outs[0]) == 5 else outs[0][2:]  # NCHWc: [N, C/8, H, W, 8]
        return 2.0 * math.prod(shapes[1]) * math.prod(spatial) * outs[0][0]
    if op in _MATMULS and shapes and outs:  # a prepacked weight may be missing from the shapes
        return 2.0 * math.prod(outs[0]) * shapes[0][-1]
    return 0.0
