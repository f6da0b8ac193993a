"""The vectorised helpers of the value analysis and plan agree with their direct definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slimship import make_random_identical, slim, zero_random_groups
from slimship.slimming.facts import row_inverse
from slimship.slimming.graph import unique_ints
from slimship.slimming.ops.mixing import EmptyRows


def _partition(labels: np.ndarray) -> list[int]:
    """Labels renumbered by first appearance: equal partitions give equal lists."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]


def _keys(rng: np.random.Generator) -> np.ndarray:
    n, m = int(rng.integers(0, 30)), int(rng.choice([1, 3, 16, 17, 40, 100]))
    keys = np.tile(rng.standard_normal(m), (n, 1))
    for i in range(n):  # near-duplicates that differ in one (often unsampled) column
        if rng.random() < 0.5:
            keys[i, rng.integers(0, m)] = rng.integers(0, 3)
        if rng.random() < 0.1:
            keys[i] = rng.standard_normal(m)
        if rng.random() < 0.1:
            keys[i] *= -0.0
    if n and rng.random() < 0.05:
        keys[0, 0] = np.nan
    return keys.astype(np.float32) if rng.random() < 0.3 else keys


@pytest.mark.parametrize("seed", range(4))
def test_row_inverse_partitions_like_np_unique(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(300):
        keys = _keys(rng)
        cols = None if rng.random() < 0.3 else np.flatnonzero(rng.random(keys.shape[1]) < 0.6)
        rows = None if rng.random() < 0.3 else np.flatnonzero(rng.random(len(keys)) < 0.7)
        chosen = keys if rows is None else keys[rows]
        chosen = chosen if cols is None else chosen[:, cols]
        expected = np.unique(chosen, axis=0, return_inverse=True)[1].reshape(-1)
        got = row_inverse(keys, cols, rows)
        assert _partition(got) == _partition(expected)
        assert len(got) == len(chosen) and (len(got) == 0 or got.max() < len(chosen))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_rows_match_a_direct_test(dtype) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        o, i, k = (int(v) for v in rng.integers(1, 8, 3))
        w = rng.standard_normal((o, i, k)).astype(dtype)
        w[rng.random((o, i, k)) < 0.6] = 0
        w.flat[0] = rng.choice([np.nan, np.inf, -0.0, np.finfo(dtype).tiny / 4, w.flat[0]])
        empty = EmptyRows(w.reshape(o, i * k), k)
        inputs = rng.random(i) < 0.5
        for chosen in (inputs, ~inputs, np.ones(i, dtype=bool)):
            assert (empty(chosen) == ~(w[:, chosen] != 0).reshape(o, -1).any(axis=1)).all()


def test_merges_and_zeros_together_on_a_branchy_net() -> None:
    """Identical filters, zero groups and a residual add in one model slim exactly."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 12, 3, padding=1)
            self.b = nn.Conv2d(12, 12, 1)
            self.c = nn.Conv2d(12, 12, 3, padding=1)
            self.head = nn.Linear(12, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.a(x))
            y = torch.relu(self.b(y)) + y
            return self.head(torch.relu(self.c(y)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    merging = make_random_identical(model, x, fraction=0.4, seed=1)
    zeroed = zero_random_groups(model, x, fraction=0.3, seed=2)
    assert merging > 0 and zeroed > 0
    result = slim(model, x)
    assert result.params_after < result.params_before
    with torch.no_grad():
        expected, got = model(x), result.model(x)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_unique_ints_matches_np_unique() -> None:
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 17, 300):
        values = rng.integers(-5, 50, n)
        assert np.array_equal(unique_ints(values), np.unique(values))
