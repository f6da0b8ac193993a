"""ADC: budgeted DDPG search over the graph's channel spaces, on a tiny CNN and a few episodes."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from torch import nn

from slimship.compress import compress, method_options
from slimship.compress.adc import (
    AdcOptions,
    Budget,
    Pruner,
    adc,
    aligned_counts,
    build_spaces,
    close_latency_loop,
    top_policies,
    uniform_counts,
)
from slimship.compress.groups import GroupTensors, prunable_groups
from slimship.data import Batches, digits_arrays
from slimship.errors import CompressionError
from slimship.slimming.api import count_flops, slim


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def data():
    split = digits_arrays(0)
    return Batches(split.x_train[:320], split.y_train[:320], 64, shuffle=True), torch.from_numpy(
        split.x_test[:4]
    )


OPTS = dict(episodes=6, warmup_episodes=3, target_flops_kept=0.4, finetune_epochs=1)


def test_policy_respects_budget_slims_deterministic_and_resumable(data, tmp_path):
    train, x = data
    model = tiny_cnn()
    a = compress("adc", model, (x,), train, **OPTS, seed=3)
    ckpt = tmp_path / "adc.pt"
    compress(
        "adc", model, (x,), train, **{**OPTS, "episodes": 4, "finetune_epochs": 0}, seed=3, checkpoint=ckpt
    )
    b = compress("adc", model, (x,), train, **OPTS, seed=3, checkpoint=ckpt)  # resumes at episode 4
    assert a.info["policy"] == b.info["policy"] and a.info["episodes"] == b.info["episodes"]
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert len(a.info["reward_curve"]) == 6 and set(a.info["policy"]) == set(a.info["spaces"])
    result = slim(a.model, (x,))
    assert result.flops_after <= 0.4 * count_flops(model, (x,)) * 1.001
    assert result.flops_after == pytest.approx(a.info["flops_kept_predicted"] * result.flops_before, rel=1e-6)
    a.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), a.model(x), rtol=1e-4, atol=1e-5)


def test_uniform_search_meets_budget(data):
    train, x = data
    r = compress("adc", tiny_cnn(), (x,), train, search="uniform", target_flops_kept=0.3, finetune_epochs=0)
    assert r.info["flops_kept_predicted"] <= 0.3
    assert slim(r.model, (x,)).flops_ratio >= 1 / 0.3 * 0.999


def test_unreachable_flops_budget_names_target(data):
    train, x = data
    with pytest.raises(CompressionError, match=r"target_flops_kept=0\.001"):
        compress("adc", tiny_cnn(), (x,), train, target_flops_kept=0.001, min_keep=0.5)


def test_unreachable_latency_budget_names_target_and_best(data):
    train, x = data
    with pytest.raises(CompressionError, match=r"target_latency_ms=1e-06.*'onnxruntime'.*best achievable"):
        compress(
            "adc",
            tiny_cnn(),
            (x,),
            train,
            target_latency_ms=1e-6,
            target_runtime="onnxruntime",
            latency_fractions=(),
            latency_runs=5,
        )


def test_top_k_selection_is_deterministic_and_picks_best_validation(data):
    train, x = data
    opts = {**OPTS, "top_k": 3, "select_epochs": 1, "seed": 1}
    a = compress("adc", tiny_cnn(), (x,), train, **opts)
    b = compress("adc", tiny_cnn(), (x,), train, **opts)
    assert a.info["selection"] == b.info["selection"] and a.info["policy"] == b.info["policy"]
    for va, vb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    sel = a.info["selection"]
    assert 2 <= len(sel) <= 3 and len({tuple(c["counts"]) for c in sel}) == len(sel)
    assert any(c["episode"] == 0 for c in sel)  # the uniform policy is always a candidate
    chosen = [c for c in sel if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["val_accuracy"] == max(c["val_accuracy"] for c in sel)
    assert [a.info["kept_channels"][s][0] for s in a.info["spaces"]] == chosen[0]["counts"]
    assert a.info["flops_kept_predicted"] <= 0.4 * 1.001


def test_top_policies_ranks_distinct_and_keeps_incumbent():
    curve = [
        {"episode": 1, "reward": 0.5, "counts": [3, 4]},
        {"episode": 2, "reward": 0.7, "counts": [2, 4]},
        {"episode": 3, "reward": 0.7, "counts": [2, 4]},
        {"episode": 4, "reward": 0.6, "counts": [4, 1]},
    ]
    top = top_policies(curve, ([1, 1], 0.1), 2)
    assert [c["counts"] for c in top] == [[2, 4], [1, 1]] and top[0]["episode"] == 2
    assert [c["counts"] for c in top_policies(curve, None, 3)] == [[2, 4], [4, 1], [3, 4]]


def _flops_setup():
    model = tiny_cnn().eval()
    x = torch.randn(2, 1, 8, 8)
    found, by_space = prunable_groups(model, (x,))
    spaces, flops = build_spaces(model, (x,), found.groups, by_space)
    pruner = Pruner(model, found.groups, spaces, GroupTensors(model, found.groups).norms())

    def true_cost(counts):  # the "target": FLOPs of the physically slimmed model, as a fraction
        pruner.apply(counts)
        return slim(pruner.model, (x,)).flops_after / flops.total

    return spaces, flops, true_cost


def test_latency_loop_tightens_until_the_measurement_meets_the_budget():
    spaces, flops, true_cost = _flops_setup()
    # an optimistic cost model: it predicts 60% of the true cost, so its first policy misses the budget
    budget = Budget(spaces, lambda fr: 0.6 * flops.flops(fr) / flops.total, 0.5, 0.1)
    start = uniform_counts(spaces, budget)
    counts, checks = close_latency_loop(budget, start, true_cost, margin=0.05, rounds=8, where="flops-target")
    assert checks[0]["counts"] == start and checks[0]["measured_ms"] > 0.5
    assert len(checks) >= 2 and budget.limit == 0.5  # the limit is restored after the loop
    chosen = [c for c in checks if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["counts"] == counts
    assert chosen[0]["measured_ms"] <= 0.5 * 0.95 and true_cost(counts) == chosen[0]["measured_ms"]
    assert chosen[0]["predicted_ms"] == pytest.approx(
        0.6 * flops.flops(budget.fractions(counts)) / flops.total
    )


def test_latency_loop_grows_a_policy_far_under_the_budget():
    spaces, flops, true_cost = _flops_setup()
    # a pessimistic cost model: it predicts twice the true cost, so its first policy uses half the budget
    budget = Budget(spaces, lambda fr: 2.0 * flops.flops(fr) / flops.total, 0.5, 0.1)
    start = uniform_counts(spaces, budget)
    caps = [s.n for s in spaces]
    counts, checks = close_latency_loop(budget, start, true_cost, margin=0.05, rounds=6, caps=caps)
    assert checks[0]["counts"] == start and checks[0]["measured_ms"] < 0.5 * 0.95 * 0.95
    assert len(checks) >= 2 and budget.limit == 0.5
    chosen = next(c for c in checks if c["chosen"])
    assert chosen["counts"] == counts and sum(counts) > sum(start)
    assert all(c >= s for c, s in zip(counts, start, strict=True))
    assert true_cost(counts) <= 0.5 * 0.95
    # without caps the loop keeps the first policy within the goal
    same, only = close_latency_loop(budget, start, true_cost, margin=0.05, rounds=6)
    assert same == start and len(only) == 1


@pytest.mark.parametrize("model_factor", [0.6, 2.0])  # optimistic (shrinks) and pessimistic (grows)
def test_latency_loop_measures_only_aligned_policies(model_factor: float):
    spaces, flops, true_cost = _flops_setup()
    budget = Budget(spaces, lambda fr: model_factor * flops.flops(fr) / flops.total, 0.5, 0.1)
    counts, checks = close_latency_loop(
        budget,
        uniform_counts(spaces, budget),
        true_cost,
        rounds=6,
        caps=[s.n for s in spaces],
        snap=lambda c: aligned_counts(c, spaces, 4),
    )
    assert [s.n for s in spaces] == [8, 12, 16]  # all wider than the multiple
    for check in checks:
        assert all(c % 4 == 0 for c in check["counts"]), check
    assert true_cost(counts) <= 0.5 * 0.95


def test_aligned_counts_rounds_down_but_keeps_whole_and_narrow_spaces():
    spaces, _, _ = _flops_setup()  # 8, 12 and 16 channels
    assert aligned_counts([7, 11, 15], spaces, 4) == [4, 8, 12]
    assert aligned_counts([3, 12, 16], spaces, 4) == [4, 12, 16]  # at least one multiple; whole stays
    assert aligned_counts([5, 9, 13], spaces, 16) == [5, 9, 13]  # no wider than the multiple: unchanged


def test_latency_loop_that_cannot_meet_the_budget_names_the_target():
    spaces, flops, _ = _flops_setup()
    budget = Budget(spaces, lambda fr: flops.flops(fr) / flops.total, 0.5, 0.1)
    with pytest.raises(CompressionError, match=r"target_latency_ms=0\.5 on slow-board.*3 measured round"):
        close_latency_loop(
            budget,
            uniform_counts(spaces, budget),
            lambda counts: 2.0,  # a target slower than the budget whatever the policy
            rounds=3,
            what="target_latency_ms=0.5",
            where="slow-board",
        )


def test_latency_budget_met_on_measured_onnxruntime_latency(data):
    train, x = data
    x1 = x[:1]
    r = compress(
        "adc",
        tiny_cnn(),
        (x1,),
        train,
        target_latency_ms=50.0,  # far above this model's latency: met on the first measurement
        target_runtime="onnxruntime",
        latency_fractions=(),
        latency_runs=5,
        episodes=3,
        warmup_episodes=2,
        finetune_epochs=0,
        select_epochs=0,
    )
    checks = r.info["latency_checks"]
    assert len(checks) == 1 and checks[0]["chosen"]
    assert 0 < r.info["measured_latency_ms"] <= 50.0 * 0.95
    assert r.info["predicted_latency_ms"] == checks[0]["predicted_ms"] > 0


def test_one_budget_flops_or_latency(data):
    """Both targets given is refused (one would be ignored); neither means keeping 0.25 of the FLOPs."""
    train, x = data
    with pytest.raises(CompressionError, match=r"give one of target_flops_kept \(0\.4\) and target_lat"):
        compress("adc", tiny_cnn(), (x,), train, target_flops_kept=0.4, target_latency_ms=5.0)
    r = compress("adc", tiny_cnn(), (x,), train, search="uniform", finetune_epochs=0)
    assert r.info["budget"] == {"kind": "flops_kept", "target": 0.25}


def test_options_object_matches_flat_options_and_unknown_names_are_refused(data):
    train, x = data
    flat = {"search": "uniform", "target_flops_kept": 0.3, "finetune_epochs": 0}
    a = compress("adc", tiny_cnn(), (x,), train, **flat)
    b = adc(
        tiny_cnn(),
        (x,),
        train,
        options=AdcOptions(search="uniform", finetune_epochs=0),
        target_flops_kept=0.3,
    )
    assert a.info["policy"] == b.info["policy"]
    for va, vb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb)
    assert method_options("adc") == {f.name: f.default for f in fields(AdcOptions)}
    with pytest.raises(TypeError, match="episode"):
        AdcOptions(episode=3)
    with pytest.raises(CompressionError, match="has no option 'episode'"):
        compress("adc", tiny_cnn(), (x,), train, episode=3)
    with pytest.raises(CompressionError, match="options must be a AdcOptions"):
        adc(tiny_cnn(), (x,), train, options={"episodes": 3})
