"""A reference with no finite value proves nothing: every check against it fails and says why.

The model is a small CNN whose BatchNorm has one NaN running_var (a diverged run): every output is NaN.
Before, slim verification, export parity, release agreement and verify all passed on it (NaN matched NaN).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slimship.cli import main
from slimship.compare import compare, judge_cases
from slimship.exporters.common import top1_agreement

NAN, INF = float("nan"), float("inf")
WHY = "the model's own outputs hold"


def _nan_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    ).eval()  # fmt: skip
    model[1].running_var[3] = NAN
    x = torch.randn(1, 3, 8, 8)
    assert torch.isnan(model(x)).all()
    return model, x


@pytest.fixture(scope="module")
def nan_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, x = _nan_cnn()
    path = tmp_path_factory.mktemp("nan") / "nan.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    return path


# ------------------------------------------------------------------------------------------ compare


def test_an_all_nan_reference_fails_even_against_nan_and_names_the_output_and_count():
    ref = np.full((2, 500), NAN, dtype=np.float32)
    result = compare([np.ones(3), ref], [np.ones(3), ref.copy()], 1e-4)
    assert not result.passed and math.isinf(result.max_abs_diff)
    assert "output 1: the model's own outputs hold 1,000 NaN values" in result.reason
    assert "nothing can be verified" in result.reason and "running_var" in result.reason


def test_an_all_nan_reference_against_numbers_names_the_nan_first_and_keeps_the_mismatch():
    result = compare(np.full(4, NAN), np.zeros(4), 1e-4)
    assert not result.passed
    mismatch = "a number at 4 positions where the reference is NaN"
    assert result.reason.index(WHY) < result.reason.index(mismatch)
    assert result.first_mismatch == ("output 0", (0,))


def test_inf_rules_all_inf_fails_inf_among_numbers_compares_as_values():
    all_inf = compare(np.array([INF, -INF]), np.array([INF, -INF]), 1e-4)
    assert not all_inf.passed and "0 NaN values (2 values, none finite)" in all_inf.reason
    assert compare(np.array([1.0, INF, -INF]), np.array([1.0, INF, -INF]), 1e-4).passed
    assert not compare(np.array([1.0, INF]), np.array([1.0, 5.0]), 1e-4).passed


def test_verify_verdict_fails_a_case_whose_reference_is_nan():
    ref = [[np.full((1, 5), NAN, np.float32)], [np.ones((1, 5), np.float32)]]
    same = [[r.copy() for r in outs] for outs in ref]
    overall, cases = judge_cases(ref, same, ["reference", "random_0"], 1e-4)
    assert not overall.passed and not cases["reference"].passed and cases["random_0"].passed
    assert "case 'reference' output 0: the model's own outputs hold 5 NaN values" in overall.reason


def test_top1_agreement_never_counts_nan_logits():
    nan_rows = [[np.full((3, 4), NAN)]]
    assert top1_agreement(nan_rows, nan_rows) == 0.0
    half = [[np.array([[0.1, 0.9], [NAN, NAN]])]]
    assert top1_agreement(half, half) == 0.5


# ------------------------------------------------------------------------------------------ the CLI


def test_slim_exits_2_naming_the_nan(nan_pt2, tmp_path, capsys):
    out = tmp_path / "slim.pt2"
    assert main(["slim", str(nan_pt2), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "slimship: error:" in err and "hold 5 NaN values" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("formats", [["onnx"], ["onnx", "tflite-int8"]])
def test_export_exits_2_naming_the_nan_before_any_format(nan_pt2, tmp_path, capsys, formats):
    out = tmp_path / "exp"
    assert main(["export", str(nan_pt2), "--format", *formats, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "hold 5 NaN values" in err and "Way out" not in err and "exporter is at fault" not in err
    assert not out.exists() or not any(out.iterdir())


def test_release_exits_2_and_writes_no_bundle(nan_pt2, tmp_path, capsys):
    out = tmp_path / "rel"
    args = ["--name", "nan", "--version", "0.1.0", "--format", "onnx", "--out", str(out)]
    assert main(["release", str(nan_pt2), *args]) == 2
    assert "hold 5 NaN values" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_release_agreement_on_the_target_never_counts_nan_reference_rows():
    from slimship.runtimes.measure import _accuracy

    batches = [([np.zeros((2, 3), np.float32)], None)]

    def nan_reference(arrays):
        return [np.full((2, 4), NAN, np.float32)]

    def half_nan_reference(arrays):
        return [np.array([[0.0, 1.0, 0.0, 0.0], [NAN, 0.0, 0.0, 0.0]], np.float32)]

    # the file's own NaN rows come back as -1, as the reference's do: before, -1 == -1 agreed
    assert _accuracy([[-1, -1]], batches, nan_reference)[1] == 0.0
    assert _accuracy([[1, -1]], batches, half_nan_reference)[1] == 0.5
