"""Latency probes of a channel space (built from its real layers), their cache, and `slim --channel-multiple
latency` from a .pt2 on disk."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
import yaml
from torch import nn

from slimship import zero_random_groups
from slimship.cli import main
from slimship.runtimes import get_target, latency_table
from slimship.runtimes.latency_table import MeasuredLatency, ProbeNet, export_probe
from slimship.slimming.channel_counts import LayerShape, SpaceProbe
from tests.test_cli import CONFIG, _run_config


def _conv(cin, cout, size, k=1, stride=1, groups=1) -> LayerShape:
    return LayerShape(
        "conv", cin, cout, (size, size), (k, k), (stride, stride), (k // 2, k // 2), (1, 1), groups
    )


# an inverted-residual hidden space at 12 channels: 1x1 expand in, depthwise 3x3/2, 1x1 project out, and a
# pooled linear layer reading it
PROBE = SpaceProbe(
    producers=(_conv(4, 12, 8),),
    inner=(_conv(12, 12, 8, k=3, stride=2, groups=12),),
    consumers=(_conv(12, 6, 4), LayerShape("linear", 12, 3, (1, 1))),
)


def test_probe_network_runs_the_space_layers_with_their_shapes(tmp_path) -> None:
    net = ProbeNet(PROBE)
    (x,) = net.inputs()
    assert tuple(x.shape) == (1, 4, 8, 8)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.groups, c.stride) for c in convs] == [
        (4, 12, 1, (1, 1)), (12, 12, 12, (2, 2)), (12, 6, 1, (1, 1))
    ]  # fmt: skip
    outs = net(x)
    assert tuple(outs[0].shape) == (1, 6, 4, 4) and tuple(outs[1].shape) == (1, 3)  # both consumers fed
    model = onnx.load(str(export_probe(net, "onnx", tmp_path / "probe.onnx")))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 3 and len(model.graph.input) == 1


def test_measured_latency_times_each_probe_once_per_target(monkeypatch, tmp_path) -> None:
    calls = []

    def fake_run(target, paths, inputs, **kwargs):
        calls.append([Path(p).suffix for p in paths])
        models = [{"latencies_ms": [1.0 + k, 1.0 + k]} for k in range(len(paths))]
        return SimpleNamespace(result={"models": models})

    monkeypatch.setattr(latency_table, "run_on_target", fake_run)
    wider = SpaceProbe((_conv(4, 16, 8),), (_conv(16, 16, 8, k=3, stride=2, groups=16),), (_conv(16, 6, 4),))
    source = MeasuredLatency(get_target("mobile-1t"), "onnx", workdir=tmp_path)
    assert source.latencies([[PROBE, wider]]) == [[1.0, 2.0]]
    assert source.latencies([[PROBE, wider], [wider]]) == [[1.0, 2.0], [2.0]]  # from the table
    assert calls == [[".onnx", ".onnx"]] and source.timed == 2
    untimeable = SpaceProbe((), (), (_conv(12, 6, 4),))  # nothing writes the space: no fixed inputs
    assert source.latencies([[untimeable]]) == [[0.0]] and len(calls) == 1


def _saved_program(tmp_path: Path) -> tuple[Path, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(),
        nn.Conv2d(24, 20, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 5),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 16, 16)
    zero_random_groups(model, x, fraction=0.6, seed=1)
    path = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (x,), strict=False), path)
    return path, model, x


def test_slim_cli_latency_counts_on_a_pt2(tmp_path, capsys) -> None:
    path, model, x = _saved_program(tmp_path)
    out = tmp_path / "latency.pt2"
    argv = ["slim", str(path), "--out", str(out), "--channel-multiple", "latency", "--target", "host"]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)["summary"]["channel_counts"]
    assert "latency-aware channel counts on host" in captured.err
    assert record["runtime"] == "onnxruntime" and record["format"] == "onnx" and record["probes_timed"] > 0
    spaces = record["spaces"]
    assert spaces, "the two slimmable spaces were measured"
    channels = json.loads(captured.out)["summary"]["channels"]
    for name, d in spaces.items():
        assert d["candidates"][0] == d["needed"] and d["kept"] in d["candidates"]
        assert len(d["p50_ms"]) == len(d["candidates"]) and all(t > 0 for t in d["p50_ms"])
        assert channels[name][1] == d["kept"]  # the file keeps what the policy chose
    slim_module = torch.export.load(out).module()
    assert torch.allclose(slim_module(x), model(x), atol=1e-5)
    assert torch.allclose(slim_module(x * 2 - 1), model(x * 2 - 1), atol=1e-5)


@pytest.mark.parametrize("spec", ["lat", "-1"])
def test_bad_channel_multiple_names_the_choices(tmp_path, capsys, spec) -> None:
    path, _, _ = _saved_program(tmp_path)
    assert main(["slim", str(path), "--out", str(tmp_path / "o.pt2"), "--channel-multiple", spec]) == 2
    assert "'latency'" in capsys.readouterr().err


def test_run_with_latency_counts_records_each_space(tmp_path) -> None:
    """`slim.channel_multiple: latency` in a pipeline config: the manifest records what was measured and
    kept per space, the model card says so."""
    config = yaml.safe_load(CONFIG.read_text())
    config["train"]["epochs"] = 1
    config["compress"]["options"] = {"target": 0.5, "epochs": 2}
    config["slim"]["channel_multiple"] = "latency"
    config["export"]["formats"] = ["onnx"]
    config["targets"] = ["host"]
    _, bundle, manifest = _run_config(config, tmp_path)
    slimming = manifest["slimming"]
    record = slimming["alignment"]
    assert slimming["channel_multiple"] is None
    assert record["target"] == "host" and record["runtime"] == "onnxruntime" and record["spaces"]
    for d in record["spaces"].values():
        assert d["needed"] <= d["kept"] <= d["total"] and d["kept"] in d["candidates"]
    assert slimming["flops_after"] < slimming["flops_before"]
    assert (
        "per space from latency measured on target `host` (onnxruntime)"
        in (bundle / "MODEL_CARD.md").read_text()
    )
