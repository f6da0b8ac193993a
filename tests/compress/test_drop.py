"""Drop Pruning: stochastic drop-out / drop-in of groups flows to exactly-zero groups at the target."""

from __future__ import annotations

import pytest
import torch

from slimship.compress import compress
from slimship.compress.drop import _round
from slimship.compress.hspg import GroupSparsifier
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
    with pytest.raises(CompressionError, match="rounds must be >= 1"):
        compress("drop", tiny_model(), example(), tiny_data(), rounds=0)


@pytest.mark.parametrize("revive", ["restore", "copy"])
def test_both_revivals_reach_the_target(revive: str) -> None:
    result = compress("drop", tiny_model(), example(), tiny_data(), **{**OPTIONS, "revive": revive})
    assert result.info["revived"] > 0
    check_slims(result.model)


def test_restore_brings_back_the_dropped_values() -> None:
    model = tiny_model()
    sp = GroupSparsifier(model, example(), 0.5, None)
    state = {"zero": [], "revived": 0, "dropped_values": {}}
    before = [sp.tensors.vector(i).clone() for i in range(len(sp.tensors))]
    _round(model, sp, state, 0, 3, 1.0, 2.0, 0, "restore", "magnitude")
    first = set(state["zero"])
    assert first and all(sp.tensors.is_zero(i) for i in first)
    _round(model, sp, state, 1, 3, 1.0, 2.0, 0, "restore", "magnitude")  # drop_in 1: all come back first
    back = first - set(state["zero"])
    assert back and state["revived"] == len(first)
    for i in back:
        assert torch.equal(sp.tensors.vector(i), before[i])


@pytest.mark.parametrize(("option", "value"), [("revive", "reinit"), ("criterion", "random")])
def test_bad_choice_is_named(option: str, value: str) -> None:
    with pytest.raises(CompressionError, match=f"{option}='{value}' is not one of"):
        compress("drop", tiny_model(), example(), tiny_data(), **{option: value})
