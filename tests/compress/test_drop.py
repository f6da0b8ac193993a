"""Drop Pruning: stochastic drop-out / drop-in of groups flows to exactly-zero groups at the target."""

from __future__ import annotations

import pytest
import torch

from slimship.compress import compress
from slimship.compress.drop import Drop
from slimship.data import evaluate_accuracy
from slimship.errors import CompressionError
from tests.compress.test_base import check_slims, example, one_thread, same_state, tiny_data, tiny_model

assert one_thread  # autouse fixture

OPTIONS = {"epochs": 8, "pruning_epochs": 4, "rounds": 4, "drop_in": 0.5, "target": 0.5, "lr": 0.05}


def test_reaches_target_slims_and_resumes(tmp_path) -> None:
    data = tiny_data()
    result = compress("drop", tiny_model(), example(), data, **OPTIONS)
    assert result.info["per_space"] == {"conv1.weight[0]": [4, 8], "conv2.weight[0]": [6, 12]}
    assert result.info["revived"] > 0  # drop-in happened and the run still reached the target
    assert evaluate_accuracy(result.model, data) >= 60.0
    check_slims(result.model)
    again = compress("drop", tiny_model(), example(), data, **OPTIONS)
    assert same_state(result.model, again.model)
    ckpt = tmp_path / "d.pt"
    compress("drop", tiny_model(), example(), data, checkpoint=ckpt, stop_after=3, **OPTIONS)
    resumed = compress("drop", tiny_model(), example(), data, checkpoint=ckpt, **OPTIONS)
    assert same_state(result.model, resumed.model)


def test_seed_changes_the_draw() -> None:
    data = tiny_data()
    a = compress("drop", tiny_model(), example(), data, **OPTIONS)
    b = compress("drop", tiny_model(), example(), data, **{**OPTIONS, "seed": 5})
    assert not same_state(a.model, b.model)


def test_bad_rounds() -> None:
    with pytest.raises(CompressionError, match="option 'rounds' must be an int >= 1"):
        compress("drop", tiny_model(), example(), tiny_data(), rounds=0)


@pytest.mark.parametrize("revive", ["restore", "copy"])
def test_both_revivals_reach_the_target(revive: str) -> None:
    result = compress("drop", tiny_model(), example(), tiny_data(), **{**OPTIONS, "revive": revive})
    assert result.info["revived"] > 0
    check_slims(result.model)


def test_restore_brings_back_the_dropped_values() -> None:
    sp = Drop(tiny_model(), example(), total_steps=10, rounds=3, drop_in=1.0)
    before = [b.matrix().clone() for b in sp.views]
    sp.run_round(0)
    first = sp.zero.clone()
    assert first.any() and bool(sp.views.is_zero()[first].all())
    gen = torch.Generator().manual_seed(0)
    for i, block in enumerate(sp.views):
        sp.bring_back(i, block, first[block.rows], gen)
        assert torch.equal(block.matrix(), before[i])  # the dropped groups hold their old values again
    sp.views.zero(first)
    sp.run_round(1)  # drop_in 1: every dropped group comes back before this round's draw
    assert sp.revived == int(first.sum())


@pytest.mark.parametrize(("option", "value"), [("revive", "reinit"), ("criterion", "random")])
def test_bad_choice_is_named(option: str, value: str) -> None:
    with pytest.raises(CompressionError, match=f"{option}='{value}' is not one of"):
        compress("drop", tiny_model(), example(), tiny_data(), **{option: value})
