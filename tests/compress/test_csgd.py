"""C-SGD: clusters collapse to exactly identical filters that `slim` merges with outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from slimship.compress import compress
from slimship.data import evaluate_accuracy
from slimship.errors import CompressionError
from slimship.slimming import slim
from tests.compress.test_base import check_slims, example, one_thread, same_state, tiny_data, tiny_model

assert one_thread  # autouse fixture

OPTIONS = {"epochs": 5, "target": 0.5, "lr": 0.05, "centripetal": 0.5}


@pytest.mark.parametrize("clustering", ["kmeans", "even"])
def test_identical_filters_merge(clustering: str, tmp_path) -> None:
    data = tiny_data()
    result = compress("csgd", tiny_model(), example(), data, clustering=clustering, **OPTIONS)
    assert result.info["merging"] == 4 + 6
    assert result.info["cluster_gap_before_merge"] < 0.5
    assert evaluate_accuracy(result.model, data) >= 60.0
    report = slim(result.model, example()).report
    assert {s.name: s.merged for s in report.spaces if s.merged} == {
        "conv1.weight[0]": 4,
        "conv2.weight[0]": 6,
    }
    assert result.info["removable"] == (4 + 6) / result.info["groups"]  # what slim merged away
    check_slims(result.model)
    if clustering == "kmeans":
        again = compress("csgd", tiny_model(), example(), data, clustering=clustering, **OPTIONS)
        assert same_state(result.model, again.model)
        ckpt = tmp_path / "c.pt"
        compress("csgd", tiny_model(), example(), data, checkpoint=ckpt, stop_after=2, **OPTIONS)
        resumed = compress("csgd", tiny_model(), example(), data, checkpoint=ckpt, **OPTIONS)
        assert same_state(result.model, resumed.model)


def test_final_merge_changes_little() -> None:
    """With a long enough centripetal phase, setting clusters to their means keeps the accuracy."""
    data = tiny_data()
    result = compress("csgd", tiny_model(), example(), data, test=data, epochs=8, lr=0.05, centripetal=1.0)
    assert abs(result.info["test_accuracy"] - result.info["test_accuracy_before_merge"]) <= 2.0
    assert torch.isfinite(torch.tensor(result.info["cluster_gap_before_merge"]))


def test_bad_clustering() -> None:
    with pytest.raises(CompressionError, match="clustering='spectral'"):
        compress("csgd", tiny_model(), example(), tiny_data(), clustering="spectral")
