"""HSPG and HESSO: exactly-zero groups at the target, slimmable, deterministic, resumable."""

from __future__ import annotations

import pytest
import torch

from slimship.compress import compress
from slimship.compress.hspg import HSPG
from slimship.data import evaluate_accuracy
from slimship.errors import CompressionError
from tests.compress.test_base import check_slims, example, one_thread, same_state, tiny_data, tiny_model

assert one_thread  # autouse fixture

OPTIONS = {
    "hspg": {"epochs": 6, "warmup_epochs": 1, "projection_epochs": 3, "target": 0.5, "lr": 0.05},
    "hesso": {"epochs": 6, "warmup_epochs": 1, "pruning_epochs": 3, "periods": 3, "target": 0.5, "lr": 0.05},
}


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_reaches_target_and_slims(method: str, tmp_path) -> None:
    data = tiny_data()
    result = compress(method, tiny_model(), example(), data, **OPTIONS[method])
    per_space = result.info["per_space"]
    assert per_space == {"conv1.weight[0]": [4, 8], "conv2.weight[0]": [6, 12]}
    assert result.info["completed"]
    assert [h["epoch"] for h in result.history] == list(range(1, 7))
    assert evaluate_accuracy(result.model, data) >= 60.0
    check_slims(result.model)

    again = compress(method, tiny_model(), example(), data, **OPTIONS[method])
    assert same_state(result.model, again.model)

    ckpt = tmp_path / "ckpt.pt"
    partial = compress(
        method, tiny_model(), example(), data, checkpoint=ckpt, stop_after=2, **OPTIONS[method]
    )
    assert not partial.info["completed"]
    resumed = compress(method, tiny_model(), example(), data, checkpoint=ckpt, **OPTIONS[method])
    assert same_state(result.model, resumed.model)
    assert resumed.history == result.history


def test_stages_must_fit() -> None:
    with pytest.raises(CompressionError, match="must fit in epochs=4"):
        compress("hspg", tiny_model(), example(), tiny_data(), epochs=4, warmup_epochs=2, projection_epochs=3)


def test_target_out_of_range() -> None:
    with pytest.raises(CompressionError, match="'target' must be a number in"):
        compress("hesso", tiny_model(), example(), tiny_data(), target=1.5)


def test_space_targets_override_per_space() -> None:
    opts = {**OPTIONS["hesso"], "space_targets": {"conv1.weight[0]": 0.25}}
    result = compress("hesso", tiny_model(), example(), tiny_data(), **opts)
    assert result.info["per_space"] == {"conv1.weight[0]": [2, 8], "conv2.weight[0]": [6, 12]}
    check_slims(result.model)
    with pytest.raises(CompressionError, match=r"space_targets names \['fc'\].*conv1"):
        compress("hspg", tiny_model(), example(), tiny_data(), space_targets={"fc": 0.5})


def test_salience_weighs_the_taylor_score_against_magnitude() -> None:
    space = "conv1.weight[0]"
    sp = HSPG(tiny_model(), example(), total_steps=10, spaces=[space])
    (block,) = sp.views.blocks
    scale = torch.arange(1.0, len(block) + 1)[:, None]
    block.set_matrix(scale * torch.ones(1, block.size))
    grads = scale.clone()
    grads[0] = 100.0  # the smallest group matters most
    block.set_matrix(grads * torch.ones(1, block.size), grad=True)
    eligible = torch.ones(len(sp.groups), dtype=torch.bool)
    assert sp.least(sp.scores("magnitude"), space, eligible, 1).tolist() == [int(block.rows[0])]
    assert sp.least(sp.scores("salience"), space, eligible, 1).tolist() == [int(block.rows[1])]
    with pytest.raises(CompressionError, match="criterion='random' is not one of"):
        compress("hspg", tiny_model(), example(), tiny_data(), criterion="random")


def test_magnitude_criterion_also_slims() -> None:
    result = compress("hspg", tiny_model(), example(), tiny_data(), criterion="magnitude", **OPTIONS["hspg"])
    assert result.info["per_space"] == {"conv1.weight[0]": [4, 8], "conv2.weight[0]": [6, 12]}
    check_slims(result.model)
