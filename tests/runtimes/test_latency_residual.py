"""Latency probes of a residual block's space: its conv reading and writing the space is an inner layer fed
the space's tensor (before, it was a producer reading the neighbour's width, so the probes of one space took
different inputs and `slim --channel-multiple latency` failed "on the device"). A probe that still cannot be
built is left out with a log line."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from slimship import zero_random_groups
from slimship.cli import main
from slimship.runtimes import get_target, latency_table
from slimship.runtimes.latency_table import MeasuredLatency, ProbeNet
from slimship.slimming import slim
from slimship.slimming.channel_counts import LatencyAwareCounts, LayerShape, SpaceProbe


class Residual(nn.Module):
    """y = a(x); y = y + relu(b(y)); fc(mean(y)): b reads and writes a's space."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = (
            nn.Conv2d(3, 16, 3, padding=1),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.Linear(16, 5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y + torch.relu(self.b(y))
        return self.fc(y.mean((2, 3)))


def _residual() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(1, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    return model, x


class Recording:
    """A LatencySource that records the probes asked for and says every count costs the same."""

    def __init__(self) -> None:
        self.probes: list[SpaceProbe] = []

    def latencies(self, probes):
        self.probes += [p for group in probes for p in group]
        return [[1.0] * len(group) for group in probes]


def test_a_residual_conv_is_an_inner_layer_at_the_space_width() -> None:
    model, x = _residual()
    source = Recording()
    result = slim(model, x, channel_counts=LatencyAwareCounts(source))
    assert torch.allclose(result.model(x), model(x), atol=1e-5)
    assert source.probes, "the residual space has several candidate counts"
    inputs = set()
    for probe in source.probes:
        (producer,) = probe.producers  # a: reads the 3 input channels, writes the space
        assert producer.in_channels == 3 and producer.kernel == (3, 3)
        width = producer.out_channels
        (inner,) = probe.inner  # b: reads and writes the space, at its width
        assert (inner.in_channels, inner.out_channels, inner.groups) == (width, width, 1)
        assert [c.in_channels for c in probe.consumers] == [width]  # the linear head
        net = ProbeNet(probe)
        outs = net(*net.inputs())
        assert tuple(outs[0].shape) == (1, 5)
        inputs.add(tuple(tuple(t.shape) for t in net.inputs()))
    assert inputs == {((1, 3, 6, 6),)}  # every candidate takes the same inputs: one timing process


def _conv(cin: int, cout: int, k: int = 3) -> LayerShape:
    return LayerShape("conv", cin, cout, (6, 6), (k, k), (1, 1), (k // 2, k // 2))


def test_a_probe_that_cannot_be_built_is_left_out_with_a_log_line(monkeypatch, tmp_path, caplog) -> None:
    runs = []

    def fake_run(target, paths, inputs, **kwargs):
        runs.append((len(paths), [a.shape for a in inputs]))
        return SimpleNamespace(result={"models": [{"latencies_ms": [2.0, 2.0]} for _ in paths]})

    monkeypatch.setattr(latency_table, "run_on_target", fake_run)
    good = SpaceProbe((_conv(3, 8),), (_conv(8, 8),), (LayerShape("linear", 8, 5, (1, 1)),))
    broken = SpaceProbe((_conv(3, 8), _conv(3, 4)), (), ())  # two producers of one space, unequal widths
    source = MeasuredLatency(get_target("host"), "onnx", workdir=tmp_path)
    with caplog.at_level(logging.WARNING, logger=latency_table.__name__):
        assert source.latencies([[good, broken]]) == [[2.0, 0.0]]
    assert runs == [(1, [(1, 3, 6, 6)])] and source.timed == 1
    assert "left out: it cannot be built" in caplog.text
    assert not list(Path(tmp_path).iterdir())  # its temporary folder is gone


def test_slim_cli_latency_counts_on_a_residual_pt2(tmp_path, capsys) -> None:
    model, x = _residual()
    path, out = tmp_path / "res.pt2", tmp_path / "res-lat.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    argv = ["slim", str(path), "--out", str(out), "--channel-multiple", "latency", "--target", "host"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "latency-aware channel counts on host" in err and "failed" not in err
    slim_module = torch.export.load(out).module()
    for inputs in (x, x * 2 - 1):
        assert torch.allclose(slim_module(inputs), model(inputs), atol=1e-5)
