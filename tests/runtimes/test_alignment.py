from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from slimship.runtimes import op_kinds
from slimship.runtimes.alignment import (
    CANDIDATE_MULTIPLES,
    AlignmentResult,
    build_layer_onnx,
    derive_multiple,
    measure_alignment,
    measure_alignment_kinds,
    multiple_for_kinds,
    round_channels_up,
)
from slimship.runtimes.runners import runner_for
from slimship.runtimes.targets import BUILTIN_TARGETS


@pytest.mark.parametrize(
    ("kept", "multiple", "total", "expected"),
    [(29, 8, 64, 32), (32, 8, 64, 32), (61, 8, 62, 62), (5, 1, 9, 5), (0, 8, 16, 0), (1, 4, 3, 3)],
)
def test_round_channels_up(kept, multiple, total, expected):
    assert round_channels_up(kept, multiple, total) == expected


def test_round_channels_up_rejects_kept_beyond_total():
    with pytest.raises(ValueError, match="kept=9"):
        round_channels_up(9, 4, 8)


def test_derive_multiple_finds_the_staircase():
    channels = list(range(24, 65))
    stairs = [1.0 + 0.2 * ((c + 7) // 8) for c in channels]  # flat inside blocks of 8, jumps after each
    assert derive_multiple(channels, stairs)[0] == 8
    linear = [0.01 * c for c in channels]  # every channel costs the same: no multiple pays
    assert derive_multiple(channels, linear)[0] is None
    flat = [1.0 for _ in channels]  # overhead-bound: nothing to gain either
    multiple, scores = derive_multiple(channels, flat)
    assert multiple is None and scores[8] == {"roundup": 1.0, "step": 1.0}


def test_derive_multiple_prefers_the_block_over_a_larger_multiple_when_unaligned_counts_fall_back():
    # like onnxruntime's depthwise conv: counts not a multiple of 4 leave the blocked kernel (2x slower),
    # multiples of 4 are padded to blocks of 8 (flat inside a block): rounding up is faster for every
    # candidate, but only up to 8 is it free; 16 costs more than 8
    channels = list(range(24, 65))
    blocks = [1.0 + 0.2 * ((c + 7) // 8) for c in channels]
    lat = [b * (1.0 if c % 4 == 0 else 2.0) for c, b in zip(channels, blocks, strict=True)]
    multiple, scores = derive_multiple(channels, lat)
    assert multiple == 8
    assert scores[16]["roundup"] > scores[8]["roundup"] and scores[8]["roundup"] < 1.0


def test_derive_multiple_does_not_take_a_multiple_of_the_block_for_a_period():
    # small blocks of 8 on a large fixed cost (like onnxruntime's 1x1 convs): every multiple of 16 is a
    # step, but so is every other multiple of 8; even where rounding up to 16 is let pass (cost_tol),
    # 16 is not the staircase's period
    channels = list(range(24, 65))
    lat = [10.0 + 0.5 * ((c + 7) // 8) for c in channels]
    multiple, scores = derive_multiple(channels, lat, cost_tol=0.03)
    assert scores[16]["roundup"] <= scores[8]["roundup"] * 1.03 and scores[16]["step"] > 1.03
    assert multiple == 8
    # a real 16-block: the multiples of 8 that are not multiples of 16 cost nothing to cross
    lat16 = [10.0 + 0.5 * ((c + 15) // 16) for c in channels]
    assert derive_multiple(channels, lat16, cost_tol=0.03)[0] == 16


def test_derive_multiple_takes_a_larger_multiple_only_when_it_costs_no_more_than_the_noise():
    # 16 has its own steps (crossing a multiple of 16 costs more than crossing other multiples of 8)
    # but rounding up to it costs 1.4% more than rounding to 8: more than the sweep's noise
    channels = list(range(24, 65))
    lat = [10.0 + 0.5 * ((c + 7) // 8) + 0.5 * ((c + 15) // 16) for c in channels]
    multiple, scores = derive_multiple(channels, lat)
    assert 1.01 < scores[16]["roundup"] / scores[8]["roundup"] < 1.03
    assert multiple == 8
    assert derive_multiple(channels, lat, cost_tol=0.03)[0] == 16


def test_derive_multiple_scores_only_multiples_the_sweep_can_round_to():
    multiple, scores = derive_multiple([6, 7, 8, 9, 10], [1.0, 1.0, 1.0, 2.0, 2.0])
    assert set(scores) == {8, 4, 2} and multiple == 8


@pytest.mark.parametrize("op", ["conv", "conv1x1", "dwconv", "linear"])
def test_layer_models_have_the_requested_channels(tmp_path, op):
    path = build_layer_onnx(tmp_path / f"{op}.onnx", op, in_channels=16, out_channels=11, spatial=5)
    onnx.checker.check_model(onnx.load(str(path)))
    x = np.ones((5, 16) if op == "linear" else (1, 16, 5, 5), np.float32)
    (y,) = runner_for(path).run([x])
    assert y.shape == ((5, 11) if op == "linear" else (1, 11, 5, 5))


def test_dwconv_layer_is_depthwise_over_the_first_channels(tmp_path):
    path = build_layer_onnx(tmp_path / "dw.onnx", "dwconv", in_channels=8, out_channels=3, spatial=4)
    (conv,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    assert {a.name: a.i for a in conv.attribute}["group"] == 3
    x = np.zeros((1, 8, 4, 4), np.float32)
    x[:, 3:] = 100.0  # channels past the first 3 must not reach the output
    (y,) = runner_for(path).run([x])
    (y0,) = runner_for(path).run([np.zeros_like(x)])
    np.testing.assert_array_equal(y, y0)
    with pytest.raises(ValueError, match="dwconv slices 9"):
        build_layer_onnx(tmp_path / "bad.onnx", "dwconv", in_channels=8, out_channels=9, spatial=4)


def test_unknown_layer_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="op must be one of"):
        build_layer_onnx(tmp_path / "x.onnx", "conv5x5", in_channels=4, out_channels=4, spatial=4)


def test_measure_alignment_times_every_count(tmp_path):
    result = measure_alignment(
        BUILTIN_TARGETS["mobile-1t"],
        op="linear",
        channels=range(6, 11),
        in_channels=8,
        spatial=4,
        runs=3,
        warmup=1,
        workdir=tmp_path,
    )
    assert result.channels == [6, 7, 8, 9, 10] and len(result.p50_ms) == 5 and min(result.p50_ms) > 0
    assert set(result.scores) <= {16, 8, 4, 2} and 2 in result.scores
    assert result.multiple in (None, *result.scores)
    assert list(tmp_path.iterdir()) == []


def test_depthwise_sweep_per_kind_picks_a_measured_multiple(tmp_path):
    results = measure_alignment_kinds(
        BUILTIN_TARGETS["mobile-1t"],
        ("conv1x1", "dwconv"),
        channels=range(14, 19),
        spatial={"dwconv": 6, "conv1x1": 4},
        in_channels=None,
        runs=3,
        warmup=1,
        workdir=tmp_path,
    )
    assert list(results) == ["conv1x1", "dwconv"]
    dw = results["dwconv"]
    assert dw.op == "dwconv" and dw.channels == [14, 15, 16, 17, 18] and len(dw.p50_ms) == 5
    assert min(dw.p50_ms) > 0 and set(dw.scores) == {16, 8, 4, 2}
    for r in results.values():
        assert r.multiple in (None, *r.scores)
    combined = multiple_for_kinds(results, ["conv1x1", "dwconv", "linear"])
    assert combined in {None} | {r.multiple for r in results.values()}
    assert list(tmp_path.iterdir()) == []


def test_multiple_for_kinds_takes_the_largest_favoured_multiple():
    def result(multiple):
        return AlignmentResult("t", "op", "onnx", [], [], {}, multiple, 0.03)

    results = {"conv": result(8), "dwconv": result(16), "conv1x1": result(None)}
    assert multiple_for_kinds(results, ["conv", "dwconv"]) == 16
    assert multiple_for_kinds(results, ["conv", "conv1x1", "linear"]) == 8
    assert multiple_for_kinds(results, ["conv1x1"]) is None
    assert set(CANDIDATE_MULTIPLES) >= {8, 16}


def test_op_kinds_reads_the_layer_kinds_from_the_graph():
    separable = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()  # fmt: skip
    x = torch.randn(1, 3, 8, 8)
    assert op_kinds(separable, (x,)) == ("conv", "conv1x1", "dwconv", "linear")
    assert op_kinds(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval(), (x,)) == ("conv",)
    # a grouped (not depthwise) conv is a conv
    assert op_kinds(nn.Conv2d(4, 8, 3, groups=2).eval(), (torch.randn(1, 4, 8, 8),)) == ("conv",)


def test_the_sweep_proposes_the_strict_and_the_lenient_multiple_for_the_whole_model_to_decide():
    from slimship.pipeline.alignment import candidate_multiples
    from slimship.runtimes.alignment import AlignmentResult

    channels = list(range(24, 65))
    costly16 = [10.0 + 0.5 * ((c + 7) // 8) + 0.5 * ((c + 15) // 16) for c in channels]  # 8, or 16 at 3%
    flat = [1.0 for _ in channels]

    def result(op: str, p50: list[float]) -> AlignmentResult:
        multiple, scores = derive_multiple(channels, p50)
        return AlignmentResult("t", op, "onnx", channels, p50, scores, multiple, 0.03)

    swept = {"conv": result("conv", costly16), "linear": result("linear", flat)}
    assert candidate_multiples(swept) == [8, 16]
    assert candidate_multiples({"linear": result("linear", flat)}) == []
