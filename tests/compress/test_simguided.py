"""Simulation-guided and plain iterative magnitude pruning: zero groups that slim removes."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from slimship.compress import compress, sparsifier
from slimship.compress.simguided import SimGuided, schedule
from slimship.data import Batches, digits_arrays
from slimship.errors import CompressionError
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
    assert r.info["group_sparsity"] == pytest.approx(0.5) == r.info["removable"]
    assert all(kept == total // 2 for kept, total in r.info["kept_channels"].values())
    result = slim(r.model, (x,))
    assert result.flops_after < result.flops_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), r.model(x), rtol=1e-4, atol=1e-5)


def test_masked_groups_keep_learning_in_the_simulation(data):
    """Gradients of the simulated (masked) network reach the full weights, so masked groups move."""
    train, x = data
    model = tiny_cnn()
    steps = [b for b in train]
    sp = SimGuided(model, (x,), total_steps=len(steps) + 1, prune_steps=1, pruning_steps=len(steps) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def consumers():
        return [torch.cat([s.read() for s in b.consume], dim=1).clone() for b in sp.views]

    before, masked_ever = consumers(), torch.zeros_like(sp.zero)
    model.train()
    for xb, yb in steps:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        masked_ever |= sp.masked  # this forward ran with their consuming slices at zero
        sp.after_backward()  # puts the masked consumers back: the optimizer updates the full weights
        optimizer.step()
        sp.after_step()  # masks the groups under the threshold for the next forward
    assert masked_ever.any() and not sp.zero.any()  # the cut comes at the end of the pruning step
    sp.unmask()
    for block, old, now in zip(sp.views, before, consumers(), strict=True):
        rows = masked_ever[block.rows]
        moved = (now[rows] != old[rows]).any(1)
        assert moved.all() and bool((now[rows].abs().sum(1) > 0).all())


@pytest.mark.parametrize("finetune_epochs", [0, 1])
def test_one_shot_magnitude_pruning_reaches_the_target_and_slims(data, finetune_epochs):
    """epochs_per_step=0: every cut before any training (then optional fine-tuning), exactly to target."""
    train, x = data
    dense = tiny_cnn()
    r = compress(
        "magnitude",
        dense,
        (x,),
        train,
        target=0.5,
        prune_steps=3,
        epochs_per_step=0,
        finetune_epochs=finetune_epochs,
    )
    assert r.info["kept_channels"] == {"0.weight[0]": [4, 8], "3.weight[0]": [4, 8]}
    assert len(r.history) == finetune_epochs
    model = r.model.eval()
    if finetune_epochs == 0:  # no training: the kept weights are the dense model's own
        kept = model[0].weight.flatten(1).abs().sum(1) > 0
        torch.testing.assert_close(model[0].weight[kept], dense[0].weight[kept], rtol=0, atol=0)
    result = slim(model, (x,))
    assert result.params_after < result.params_before
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_one_shot_sparsifier_cuts_at_the_first_step_and_simguided_refuses_it(data):
    train, x = data
    model = tiny_cnn()
    sp = sparsifier("magnitude", model, (x,), total_steps=2, prune_steps=2, pruning_steps=0)
    xb, yb = next(iter(train))
    torch.nn.functional.cross_entropy(model(xb), yb).backward()
    sp.after_backward()
    assert sp.cuts_done == 2 and sp.per_space() == {"0.weight[0]": [4, 8], "3.weight[0]": [4, 8]}
    with pytest.raises(CompressionError, match=r"simguided simulates .* use 'magnitude' for one-shot"):
        compress("simguided", tiny_cnn(), (x,), train, prune_steps=2, epochs_per_step=0)
    with pytest.raises(CompressionError, match=r"option 'epochs_per_step' must be an int >= 0, got -1"):
        compress("magnitude", tiny_cnn(), (x,), train, prune_steps=2, epochs_per_step=-1)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("prune_steps", "2", "option 'prune_steps' must be an int >= 1"),
        ("epochs_per_step", 1.5, "option 'epochs_per_step' must be an int >= 0"),
        ("finetune_epochs", -1, "option 'finetune_epochs' must be an int >= 0"),
        ("lr", "fast", "option 'lr' must be a number > 0"),
        ("target", "half", "option 'target' must be a number in [0, 1)"),
    ],
)
def test_compress_options_of_the_wrong_type_are_named(data, option, value, message):
    train, x = data
    with pytest.raises(CompressionError, match=re.escape(message)):
        compress("magnitude", tiny_cnn(), (x,), train, **{option: value})
