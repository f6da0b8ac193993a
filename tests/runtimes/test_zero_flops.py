"""A model without FLOPs (only reshapes and activations) has no FLOPs ratio: shown as n/a, never a crash."""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from rich.console import Console

from slimship.pipeline.run import summary_table
from slimship.runtimes.measure import (
    BenchResult,
    LatencyStats,
    Measurement,
    format_bench_table,
    speedup_from_ratios,
)
from slimship.runtimes.targets import get_target


def _text(table) -> str:
    out = io.StringIO()
    Console(file=out, width=300).print(table)
    return out.getvalue()


def test_zero_flops_give_no_ratio_and_no_efficiency() -> None:
    for flops in ((0, 0), (1000, 0), (0, 1000)):
        sp = speedup_from_ratios([1.0, 1.2, 0.9], "d.onnx", "s.onnx", "host", flops=flops)
        assert sp.median == 1.0 and sp.flops_ratio is None and sp.efficiency is None
    sp = speedup_from_ratios([2.0], "d.onnx", "s.onnx", "host", flops=(400, 100))
    assert sp.flops_ratio == 4.0 and sp.efficiency == 0.5


def test_the_bench_table_shows_n_a_for_the_efficiency() -> None:
    stats = LatencyStats.from_samples([1.0, 1.0])
    rows = [
        Measurement(m, "host", {"backend": "onnxruntime", "version": "x"}, "fp32", 1.0, stats, 1, 1, 0, None)
        for m in ("d.onnx", "s.onnx")
    ]
    sp = speedup_from_ratios([1.1], "d.onnx", "s.onnx", "host", flops=(0, 0))
    text = _text(format_bench_table(BenchResult(get_target("host"), rows, [sp])))
    slim_row = next(line for line in text.splitlines() if "s.onnx" in line)
    assert "1.10x" in slim_row and "n/a" in slim_row


def test_the_run_summary_shows_n_a_for_the_flops_ratio() -> None:
    summary = {"params": [10, 10], "flops": [0, 0], "files": {}, "accuracy": {"dense": None}, "latency": []}
    flops_row = next(line for line in _text(summary_table(summary)).splitlines() if "FLOPs" in line)
    assert "n/a" in flops_row and "0.00x" not in flops_row


def test_a_speedup_whose_pairs_disagree_is_called_unclear() -> None:
    """p50 can say slower while the median of per-pair ratios says faster: the spread decides the word."""
    row = {"target": "host", "format": "onnx", "emulated": False, "dense_p50_ms": 0.014, "p50_ms": 0.016}
    summary = {"params": [10, 5], "flops": [10, 5], "files": {}, "accuracy": {"dense": None}}
    unclear = {**row, "speedup": 1.11, "speedup_p10": 0.8, "speedup_p90": 1.4}
    line = next(x for x in _text(summary_table(summary | {"latency": [unclear]})).splitlines() if "p50" in x)
    assert "1.11x (0.80-1.40) unclear: the spread crosses 1.0" in line
    clear = {**row, "speedup": 1.8, "speedup_p10": 1.6, "speedup_p90": 2.0}
    line = next(x for x in _text(summary_table(summary | {"latency": [clear]})).splitlines() if "p50" in x)
    assert "speedup 1.80x (1.60-2.00)" in line and "unclear" not in line


class ReshapeOnly(torch.nn.Module):
    """No multiply-adds at all: torch's FLOP counter gives 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).flatten(1)


def reshape_only() -> torch.nn.Module:
    return ReshapeOnly().eval()


@pytest.mark.slow
def test_run_on_a_model_without_flops_completes(tmp_path, capsys) -> None:
    from slimship.cli import main

    config = {
        "model": {"factory": "tests.runtimes.test_zero_flops:reshape_only", "input_shape": [1, 4, 4]},
        "export": {"formats": ["onnx"]},
        "targets": ["host"],
        "bench": {"runs": 3, "warmup": 1},
        "release": {"name": "flat", "version": "0.1.0", "out": str(tmp_path / "out")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    flops_row = next(line for line in out.splitlines() if "FLOPs" in line)
    assert "n/a" in flops_row
    assert (tmp_path / "out" / "flat-0.1.0" / "manifest.json").is_file()
