"""slimship.compare: NaN and Inf are values; every caller's pass/fail goes through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slimship.compare import REL_BOUNDS, compare, compare_cases, finite_scale

NAN, INF = float("nan"), float("inf")


def test_nan_to_finite_fails_and_names_the_positions():
    ref = np.full((2, 3), NAN, dtype=np.float32)
    got = np.zeros((2, 3), dtype=np.float32)
    result = compare(ref, got, 1e-4)
    assert not result.passed
    assert math.isinf(result.max_abs_diff) and math.isinf(result.max_rel_diff)
    assert "a number at 6 positions where the reference is NaN" in result.reason
    assert result.first_mismatch == ("output 0", (0, 0))


def test_finite_to_nan_fails_with_the_first_index():
    ref = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = ref.copy()
    got[1, 2] = got[2, 0] = NAN
    result = compare(ref, got, 1e-4)
    assert not result.passed
    assert "NaN at 2 positions where the reference is a number" in result.reason
    assert result.first_mismatch == ("output 0", (1, 2))


def test_matching_nan_and_inf_positions_pass():
    ref = np.array([1.0, NAN, INF, -INF, 2.0])
    got = np.array([1.0 + 1e-6, NAN, INF, -INF, 2.0])
    result = compare(ref, got, 1e-4)
    assert result.passed and result.reason == ""
    assert result.max_abs_diff == pytest.approx(1e-6)


@pytest.mark.parametrize(
    ("ref", "got", "message"),
    [
        ([INF, 1.0], [-INF, 1.0], "another value at 1 positions where the reference is ±Inf"),
        ([INF, 1.0], [1e30, 1.0], "another value at 1 positions where the reference is ±Inf"),
        ([1.0, 1.0], [1.0, -INF], "Inf at 1 positions where the reference is finite"),
        ([INF, 1.0], [NAN, 1.0], "NaN at 1 positions where the reference is a number"),
    ],
)
def test_inf_sign_flip_and_inf_out_of_place_fail(ref, got, message):
    result = compare(np.array(ref), np.array(got), 1e30)  # no tolerance can excuse a non-finite mismatch
    assert not result.passed
    assert message in result.reason


def test_tolerance_is_relative_to_the_finite_reference_scale():
    ref = np.array([100.0, NAN, -INF, 3.0])
    assert finite_scale([ref]) == 100.0
    assert finite_scale([np.array([0.01, NAN])]) == 1.0  # max(1, ...)
    close = compare(ref, ref + np.array([0.009, 0, 0, 0]), 1e-4)
    far = compare(ref, ref + np.array([0.011, 0, 0, 0]), 1e-4)
    assert close.passed and close.tolerance == pytest.approx(0.01)
    assert not far.passed and "max|diff| 0.011 > tolerance 0.01" in far.reason
    assert far.first_mismatch == ("output 0", (0,))
    assert far.max_rel_diff == pytest.approx(0.011 / 100)


def test_torch_tensors_and_numpy_arrays_compare_alike():
    ref = torch.tensor([[1.0, float("nan")]], dtype=torch.bfloat16)
    assert compare(ref, ref.clone(), 1e-4).passed
    assert not compare(ref, torch.zeros(1, 2), 1e-4).passed
    assert compare(torch.ones(3), np.ones(3, dtype=np.float32), 1e-4).passed


def test_integer_and_bool_outputs_compare_exactly():
    ids = np.array([3, 1, 4], dtype=np.int64)
    assert compare(ids, ids.copy(), 1e30).passed
    off = compare(ids, np.array([3, 1, 5], dtype=np.int64), 1e30)
    assert not off.passed and off.first_mismatch == ("output 0", (2,))
    assert not compare(np.array([True, False]), np.array([True, True]), 1e30).passed
    kind = compare(ids, ids.astype(np.float32), 1e30)
    assert not kind.passed and "float against integer/bool" in kind.reason


def test_count_and_shape_mismatches_fail():
    one = np.ones((2, 3), dtype=np.float32)
    count = compare([one, one], [one], 1e-4)
    assert not count.passed and "1 outputs where the reference has 2" in count.reason
    shape = compare(one, np.ones((3, 2), dtype=np.float32), 1e-4)
    assert not shape.passed and "shape [3, 2], the reference has [2, 3]" in shape.reason
    assert compare(one, one.reshape(1, 2, 3), 1e-4).passed  # size-1 dims only: same element order


def test_cases_share_one_scale_and_label_the_failure():
    ref = [[np.array([10.0])], [np.array([1.0, 2.0])]]
    got = [[np.array([10.0])], [np.array([1.0, NAN])]]
    result = compare_cases(ref, got, ["example", "random_0"], REL_BOUNDS["fp32"])
    assert not result.passed
    assert result.first_mismatch == ("case 'random_0' output 0", (1,))
    assert result.tolerance == pytest.approx(REL_BOUNDS["fp32"] * 10)


def test_exporters_check_with_the_bounds_verify_uses():
    from slimship.exporters.onnx_export import ONNX_FP32_REL_BOUND
    from slimship.exporters.tflite_export import PARITY_BOUNDS

    assert REL_BOUNDS["fp32"] == ONNX_FP32_REL_BOUND
    assert {variant: bound for variant, (bound, _) in PARITY_BOUNDS.items()} == REL_BOUNDS


def test_top1_agreement_counts_a_nan_row_as_disagreeing():
    from slimship.exporters.common import top1_agreement

    ref = [[np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])]]
    nan_row = [[np.array([[0.1, 0.9, 0.0], [NAN, NAN, NAN]])]]  # argmax alone would say class 0: agree
    assert top1_agreement(ref, ref) == 1.0
    assert top1_agreement(ref, nan_row) == 0.5


def test_slim_verification_is_relative_to_small_outputs() -> None:
    """Slimming is exact: a 1e-3 relative error on outputs of scale 1e-3 fails, though it is 1e-6 absolute."""
    import torch

    from slimship.slimming.api import verify_outputs

    class Small(torch.nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = offset

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 1e-3 * torch.tanh(x) + self.offset

    x = (torch.randn(4, 8),)
    assert verify_outputs(Small(0.0), Small(0.0), x).passed
    result = verify_outputs(Small(0.0), Small(1e-6), x, rtol=1e-5)
    assert not result.passed and result.max_rel_diff > 1e-4


def test_quantised_bounds_are_relative_to_small_outputs() -> None:
    """An int8 file off by more than its whole output range fails, even when that range is 3.3e-5."""
    from slimship.compare import MAGNITUDE_CAPS, REL_BOUNDS
    from slimship.exporters.common import compare_outputs

    reference = [[np.linspace(-1.6e-5, 1.7e-5, 10, dtype=np.float32)]]
    broken = [[reference[0][0] + 3.9e-5]]
    int8 = compare_outputs(reference, broken, ["example"], REL_BOUNDS["int8"], MAGNITUDE_CAPS["int8"])
    assert not int8.passed and int8.tolerance <= 1.7e-5 + 1e-9  # capped at max|reference|
    close = [[reference[0][0] * 1.1]]
    assert compare_outputs(reference, close, ["example"], REL_BOUNDS["int8"], MAGNITUDE_CAPS["int8"]).passed
