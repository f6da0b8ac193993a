"""Per-space kept counts: a mapping or a latency-aware policy (an injected table here, no timing)."""

import pytest
import torch
from torch import nn

from slimship.errors import SlimmingError
from slimship.slimming import slim
from slimship.slimming.channel_counts import (
    LatencyAwareCounts,
    LayerShape,
    TableLatency,
    candidate_counts,
    fastest_count,
)


def _model() -> tuple[nn.Module, torch.Tensor]:
    """conv 3->16, BN, ReLU, depthwise 16, 1x1 16->24, BN, pool, FC 24->5; A keeps 9 of 16, B 15 of 24."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 24, 1, bias=False),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 5),
    )
    model.insert(3, nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        model[0].weight[9:] = 0  # A: 7 removable channels
        model[1].bias[9:] = model[1].running_mean[9:] = 0
        model[4].weight[15:] = 0  # B: 9 removable channels
        model[5].bias[15:] = model[5].running_mean[15:] = 0
    return model.eval(), torch.randn(2, 3, 6, 6)


def _space(result, name):
    return {s.name: s for s in result.report.spaces}[name]


def test_mapping_keeps_the_requested_count_and_stays_exact() -> None:
    model, x = _model()
    plain = slim(model, x)
    assert (_space(plain, "0.weight[0]").channels_after, _space(plain, "4.weight[0]").channels_after) == (
        9,
        15,
    )
    counted = slim(model, x, channel_counts={"0.weight[0]": 12})
    assert _space(counted, "0.weight[0]").channels_after == 12
    assert _space(counted, "4.weight[0]").channels_after == 15  # not named: keeps what it needs
    assert counted.flops_after > plain.flops_after
    assert torch.allclose(counted.model(x), model(x), atol=1e-5)
    assert torch.allclose(counted.model(x * 3 + 1), model(x * 3 + 1), atol=1e-5)


def test_bad_counts_are_errors_naming_the_space() -> None:
    model, x = _model()
    with pytest.raises(SlimmingError, match="nope"):
        slim(model, x, channel_counts={"nope": 4})
    with pytest.raises(SlimmingError, match=r"17.*16 channels"):
        slim(model, x, channel_counts={"0.weight[0]": 17})
    with pytest.raises(SlimmingError, match="not both"):
        slim(model, x, channel_counts={}, channel_multiple=8)


def _table() -> dict[LayerShape, float]:
    """A staircase table: time = multiply-adds, but a depthwise conv whose channels are not a multiple of
    8 runs 8x slower (a runtime leaving it off its blocked kernels). Every shape the policy can ask for."""

    def conv(cin, cout, k, groups=1):
        pad = k // 2
        return LayerShape("conv", cin, cout, (6, 6), (k, k), (1, 1), (pad, pad), (1, 1), groups)

    def cost(s: LayerShape) -> float:
        macs = s.in_channels // s.groups * s.out_channels * s.kernel[0] * s.kernel[1] * 36
        if s.op == "linear":
            macs = s.in_channels * s.out_channels
        return float(macs * (8 if s.depthwise and s.out_channels % 8 else 1))

    shapes = [LayerShape("linear", b, 5, (1, 1)) for b in (15, 16)]
    for a in (9, 12, 16):
        shapes += [conv(3, a, 3), conv(a, a, 3, groups=a), *(conv(a, b, 1) for b in (15, 16))]
    return {s: cost(s) for s in shapes}


def test_latency_policy_rounds_up_only_where_the_table_says_it_is_faster() -> None:
    model, x = _model()
    policy = LatencyAwareCounts(TableLatency(_table()))
    result = slim(model, x, channel_counts=policy)
    a, b = _space(result, "0.weight[0]"), _space(result, "4.weight[0]")
    # A (conv, depthwise, 1x1 in): 9 -> 16 makes its depthwise conv 8x faster, worth the extra work
    assert (a.channels_after, b.channels_after) == (16, 15)
    assert any("latency" in reason for reason in a.kept)
    decision = policy.decisions["0.weight[0]"]
    assert decision.candidates == (9, 12, 16) and decision.chosen == 16
    assert decision.latencies[2] < decision.latencies[0]
    # B (1x1 out, FC in): 16 costs more multiply-adds and buys nothing, so it keeps exactly 15
    assert policy.decisions["4.weight[0]"].chosen == 15
    assert policy.decisions["4.weight[0]"].latencies[1] > policy.decisions["4.weight[0]"].latencies[0]
    assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_a_missing_table_entry_is_an_error_naming_the_layer() -> None:
    model, x = _model()
    table = {s: v for s, v in _table().items() if s.op != "linear"}
    with pytest.raises(SlimmingError, match="linear"):
        slim(model, x, channel_counts=LatencyAwareCounts(TableLatency(table)))


def test_candidate_counts_stay_within_the_width() -> None:
    assert candidate_counts(9, 16) == [9, 12, 16]
    assert candidate_counts(15, 24) == [15, 16]
    assert candidate_counts(13, 14) == [13, 14]
    assert candidate_counts(16, 64) == [16]


def test_fastest_count_keeps_the_needed_count_unless_a_round_up_is_clearly_faster() -> None:
    assert fastest_count([9, 12, 16], [1.0, 0.99, 0.985], 0.03) == 9  # within the margin: noise
    assert fastest_count([9, 12, 16], [1.0, 0.5, 0.51], 0.03) == 12  # equally fast: fewer FLOPs
    assert fastest_count([9, 12, 16], [1.0, 0.5, 0.51], 0.03, aligned=True) == 16  # ... or more aligned
    assert fastest_count([9, 12, 16], [1.0, 0.7, 0.5], 0.03, aligned=True) == 16
    assert fastest_count([9, 12, 16], [1.0, 0.5, 0.7], 0.03, aligned=True) == 12
