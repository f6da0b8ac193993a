"""HAKD: width family from the slimming engine, latency table from real runners, distillation."""

from __future__ import annotations

import pytest
import torch

from slimship.compress import compress, thinned
from slimship.compress.distill import choose_student
from slimship.data import evaluate_accuracy
from slimship.errors import CompressionError
from tests.compress.test_base import example, one_thread, tiny_data, tiny_model

assert one_thread  # autouse fixture


def test_thinned_keeps_fraction_of_channels() -> None:
    teacher = tiny_model()
    student = thinned(teacher, example(), 0.5)
    assert student.conv1.weight.shape[0] == 4 and student.conv2.weight.shape[0] == 6
    assert student.fc.weight.shape == (4, 6)
    with torch.no_grad():
        assert student(example()[0]).shape == teacher(example()[0]).shape


def test_choose_student_budget_and_fallback() -> None:
    rows = [
        {"name": "a", "params": 100, "latency_ms": {"ort": 2.0}, "flops_ratio": 2.0},
        {"name": "b", "params": 50, "latency_ms": {"ort": 1.0}, "flops_ratio": 4.0},
        {"name": "c", "params": 10, "latency_ms": {"ort": 0.5}, "flops_ratio": 9.0},
    ]
    assert choose_student(rows, 1.5, "ort", None) == (rows[1], True)
    assert choose_student(rows, 5.0, "ort", 5.0) == (rows[2], True)
    assert choose_student(rows, 0.1, "ort", None) == (rows[2], False)


def test_min_flops_ratio_binds_the_fallback_too() -> None:
    rows = [
        {"name": "a", "params": 100, "latency_ms": {"ort": 2.0}, "flops_ratio": 5.0},
        {"name": "b", "params": 50, "latency_ms": {"ort": 1.0}, "flops_ratio": 3.9},
    ]
    assert choose_student(rows, 0.5, "ort", 4.0) == (rows[0], False)  # b is faster but under 4x
    with pytest.raises(CompressionError, match=r"min_flops_ratio=6.0 \(best 5.00x\)"):
        choose_student(rows, 5.0, "ort", 6.0)


@pytest.mark.slow
def test_hakd_latency_table_and_distillation() -> None:
    data = tiny_data()
    teacher = tiny_model()
    opts = {"widths": (0.5,), "latency_budget_ms": 1e9, "repeats": 3, "epochs": 4, "lr": 0.05}
    result = compress("hakd", teacher, example(), data, test=data, **opts)
    table = result.info["latency_table"]
    assert [r["name"] for r in table] == ["teacher", "w0.5"]
    assert all(r["latency_ms"]["onnxruntime"] > 0 for r in table)
    assert result.info["chosen"] == "w0.5" and result.info["budget_met"]
    assert result.info["flops_ratio"] > 1.5
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in teacher.parameters())
    assert evaluate_accuracy(result.model, data) >= 60.0
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]


def test_hakd_needs_budget() -> None:
    with pytest.raises(CompressionError, match="latency_budget_ms or a positive speedup"):
        compress("hakd", tiny_model(), example(), tiny_data(), speedup=None)
