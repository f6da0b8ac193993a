"""ADC: budgeted DDPG search over the graph's channel spaces, on a tiny CNN and a few episodes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimship.compress import compress
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


OPTS = dict(episodes=6, warmup_episodes=3, target_flops_ratio=0.4, finetune_epochs=1)


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
    assert result.flops_after == pytest.approx(
        a.info["flops_ratio_predicted"] * result.flops_before, rel=1e-6
    )
    a.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), a.model(x), rtol=1e-4, atol=1e-5)


def test_uniform_search_meets_budget(data):
    train, x = data
    r = compress("adc", tiny_cnn(), (x,), train, search="uniform", target_flops_ratio=0.3, finetune_epochs=0)
    assert r.info["flops_ratio_predicted"] <= 0.3
    assert slim(r.model, (x,)).flops_ratio >= 1 / 0.3 * 0.999


def test_unreachable_flops_budget_names_target(data):
    train, x = data
    with pytest.raises(CompressionError, match=r"target_flops_ratio=0\.001"):
        compress("adc", tiny_cnn(), (x,), train, target_flops_ratio=0.001, min_keep=0.5)


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
