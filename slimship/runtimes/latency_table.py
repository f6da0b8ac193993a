"""Latency of a channel space's layers on a target, measured: the source `LatencyAwareCounts` decides with.

For each space and candidate kept count, the space's actual layers (with their real shapes: channels,
kernel, stride, padding, input size) are built into one small network: the producers read inputs of the
neighbouring spaces' sizes and write the space; depthwise convs run on it; consumers read it (through an
average pool where they read it at a smaller size, a global one for a linear layer after a pooled conv).
Between candidates of one space only the space's width changes, so their networks take the same inputs:
they are exported in the target runtime's format and timed in one process, interleaved. Results are cached
per target, format and probe (all layer shapes), so a shape is timed once per run of a policy. Layers the
network cannot feed from the space's tensors are left out of it (they are timed nowhere; rare in convnets),
and so is, with a log line, a probe that cannot be built, exported or run: it is slimship's own network, so
its failure is never the user's model's or device's (that space keeps its needed count).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.errors import DeviceError
from slimship.runtimes.execute import run_on_target
from slimship.runtimes.targets import Target
from slimship.slimming.channel_counts import LayerShape, SpaceProbe

log = logging.getLogger(__name__)


def _layer(shape: LayerShape) -> nn.Module:
    if shape.op == "linear":
        return nn.Linear(shape.in_channels, shape.out_channels)
    return nn.Conv2d(
        shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding, shape.dilation,
        shape.groups,
    )  # fmt: skip


def _key(shape: LayerShape, out: bool) -> tuple:
    size = shape.out_size if out else shape.size
    return ("linear", size[0]) if shape.op == "linear" else ("conv", *size)


class ProbeNet(nn.Module):
    """The network of one SpaceProbe (see the module docstring); `inputs()` gives its example inputs."""

    def __init__(self, probe: SpaceProbe, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.probe = probe
        self.producers = nn.ModuleList(_layer(s) for s in probe.producers)
        self.inner = nn.ModuleList(_layer(s) for s in probe.inner)
        self.consumers = nn.ModuleList(_layer(s) for s in probe.consumers)
        self.eval()

    def inputs(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        return tuple(
            torch.randn(
                *((s.size[0], s.in_channels) if s.op == "linear" else (1, s.in_channels, *s.size)),
                generator=g,
            )
            for s in self.probe.producers
        )

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        at: dict[tuple, torch.Tensor] = {}
        for layer, shape, x in zip(self.producers, self.probe.producers, xs, strict=True):
            y, key = layer(x), _key(shape, out=True)
            at[key] = at[key] + y if key in at else y
        for layer, shape in zip(self.inner, self.probe.inner, strict=True):
            x = _feed(at, shape)
            if x is not None:
                at[_key(shape, out=True)] = layer(x)
        outs = []
        for layer, shape in zip(self.consumers, self.probe.consumers, strict=True):
            x = _feed(at, shape)
            if x is not None:
                outs.append(layer(x))
        return (*outs, *at.values())  # every producer's work is an output: none is dead code


def _feed(at: dict[tuple, torch.Tensor], shape: LayerShape) -> torch.Tensor | None:
    """The space's tensor at `shape`'s input size: as it is, average-pooled down, or globally pooled for a
    linear layer; None when no tensor of the space can be brought to it."""
    key = _key(shape, out=False)
    if key in at:
        return at[key] if at[key].shape[-1 if shape.op == "linear" else 1] == shape.in_channels else None
    for k, t in at.items():
        if k[0] != "conv" or t.shape[1] != shape.in_channels:
            continue
        if shape.op == "linear" and shape.size[0] == 1:
            return t.mean((2, 3))
        if shape.op == "conv" and k[1] % shape.size[0] == 0 and k[2] % shape.size[1] == 0:
            return nn.functional.avg_pool2d(t, (k[1] // shape.size[0], k[2] // shape.size[1]))
    return None


def export_probe(net: ProbeNet, fmt: str, path: Path) -> Path:
    """Write `net` as an ONNX (TorchScript exporter: no parity pass needed for a timing probe), TFLite or
    ExecuTorch (XNNPACK) file."""
    inputs = net.inputs()
    if fmt == "onnx":
        names = [f"x{i}" for i in range(len(inputs))]
        torch.onnx.export(net, inputs, str(path), input_names=names, dynamo=False, opset_version=17)
    elif fmt == "tflite":
        import litert_torch

        litert_torch.convert(net, inputs).export(str(path))
    elif fmt == "pte":
        from slimship.exporters.executorch_export import lower_to_bytes

        path.write_bytes(lower_to_bytes(net, inputs))
    else:
        raise ValueError(f"fmt must be 'onnx', 'tflite' or 'pte', got {fmt!r}")
    return path


@dataclass
class MeasuredLatency:
    """A LatencySource timing probes on `target` in format `fmt` (one interleaved run per space); `table`
    caches p50 ms per probe for this target and format."""

    target: Target
    fmt: str = "onnx"
    warmup: int = 3
    runs: int = 20
    workdir: Path | None = None
    table: dict[SpaceProbe, float] = field(default_factory=dict)
    timed: int = 0  # probes built and timed (not looked up)

    def latencies(self, probes: Sequence[Sequence[SpaceProbe]]) -> list[list[float]]:
        for group in probes:
            todo = [p for p in dict.fromkeys(group) if p not in self.table]
            if todo and all(p.producers for p in todo):
                self._time(todo)
        return [[self.table.get(p, 0.0) for p in group] for group in probes]  # untimeable: all equal

    def _time(self, probes: list[SpaceProbe]) -> None:
        with tempfile.TemporaryDirectory(prefix="slimship-latency-", dir=self.workdir) as tmp:
            built = [(p, path) for k, p in enumerate(probes) if (path := self._build(p, Path(tmp), k))]
            shapes = {tuple(t.shape for t in ProbeNet(p).inputs()) for p, _ in built}
            if len(shapes) != 1:  # none built, or candidates fed differently (one process times them all)
                if shapes:
                    log.warning(
                        "latency probes of one space take different inputs %s: left out", sorted(shapes)
                    )
                return
            inputs = [t.numpy() for t in ProbeNet(built[0][0]).inputs()]
            try:
                paths = [path for _, path in built]
                run = run_on_target(self.target, paths, inputs, warmup=self.warmup, runs=self.runs)
            except DeviceError as exc:  # a probe slimship built, not the user's model: leave it out
                cause = str(exc).splitlines()[0][:300]
                log.warning(
                    "latency probes failed on %s, left out (needed counts kept): %s", self.target.name, cause
                )
                return
        for (probe, _), entry in zip(built, run.result["models"], strict=True):
            self.table[probe] = float(np.median(entry["latencies_ms"]))
        self.timed += len(built)

    def _build(self, probe: SpaceProbe, folder: Path, k: int) -> Path | None:
        """The probe's file, or None (with a log line) when its network cannot be built or exported."""
        try:
            net = ProbeNet(probe)
            with torch.no_grad():
                net(*net.inputs())
            return export_probe(net, self.fmt, folder / f"probe{k}.{self.fmt}")
        except Exception as exc:  # a probe of slimship's own making: timed nowhere, never the user's fault
            layers = [vars(s) for s in probe.layers]
            cause = f"{type(exc).__name__}: {str(exc)[:200]}"
            log.warning("latency probe %s left out: it cannot be built (%s)", layers, cause)
            return None

    def rows(self) -> list[dict[str, Any]]:
        """The table as JSON rows: the probe's layers and p50 ms."""
        return [{"layers": [vars(s) for s in probe.layers], "p50_ms": ms} for probe, ms in self.table.items()]
