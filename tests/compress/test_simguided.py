"""Simulation-guided and plain iterative magnitude pruning: zero groups that slim removes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimship.compress import compress
from slimship.compress.base import GroupTensors, make_optimizer, prunable_groups
from slimship.compress.simguided import SpaceMasks, _simulated_training, schedule
from slimship.data import Batches, digits_arrays
from slimship.slimming.api import slim


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@pytest.fixture(scope="module")
def data():
    split = digits_arrays(0)
    return Batches(split.x_train[:256], split.y_train[:256], 64, shuffle=True), torch.from_numpy(
        split.x_test[:4]
    )


def test_schedule_rises_to_target():
    s = schedule(0.6, 4)
    assert s == sorted(s) and s[-1] == pytest.approx(0.6) and s[0] > 0


@pytest.mark.parametrize("method", ["simguided", "magnitude"])
def test_reaches_group_sparsity_and_slims(data, method):
    train, x = data
    r = compress(
        method, tiny_cnn(), (x,), train, target=0.5, prune_steps=2, epochs_per_step=1, finetune_epochs=1
    )
    assert r.info["group_sparsity"] == pytest.approx(0.5)
    assert all(kept == total // 2 for kept, total in r.info["kept_channels"].values())
    result = slim(r.model, (x,))
    assert result.flops_after < result.flops_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), r.model(x), rtol=1e-4, atol=1e-5)


def test_masked_groups_keep_learning_in_the_simulation(data):
    """Gradients of the simulated (masked) network reach the full weights, so masked groups move."""
    train, x = data
    model = tiny_cnn()
    found, by_space = prunable_groups(model, (x,))
    tensors = GroupTensors(model, found.groups)
    masks = SpaceMasks(model, tensors, by_space)
    masked = masks.below(0.5)

    def consumers(i):
        return torch.cat([t[idx].detach().reshape(-1) for t, idx in masks.consume[i]])

    before = {i: consumers(i).clone() for i in masked}
    _simulated_training(model, train, masks, 0.5, 1, make_optimizer(model, 0.05), 0, "test")
    moved = [i for i in masked if not torch.equal(consumers(i), before[i])]
    assert moved and all(not tensors.is_zero(i) and bool(consumers(i).abs().sum() > 0) for i in masked)
