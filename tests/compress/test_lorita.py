"""LoRITa: factor over-parametrisation, collapse, and SVD factorisation checked against its bound."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimship.compress import compress
from slimship.compress.lorita import collapse, factorize, overparametrize
from slimship.data import Batches, digits_arrays
from slimship.errors import CompressionError


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)
    )


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


@pytest.fixture(scope="module")
def data():
    split = digits_arrays(0)
    return Batches(split.x_train[:256], split.y_train[:256], 64, shuffle=True), torch.from_numpy(
        split.x_test[:8]
    )


@pytest.mark.parametrize("depth", [2, 3])
def test_overparametrize_keeps_the_function(data, depth):
    _, x = data
    model = tiny_cnn().eval()
    with torch.no_grad():
        ref = model(x)
        overparametrize(model, depth)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        collapse(model)
        assert not any(n for n, _ in model.named_parameters() if "parametrizations" in n)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_lorita_trains_then_factorizes_with_fewer_flops(data):
    train, x = data
    r = compress("lorita", tiny_mlp(), (x,), train, epochs=2, depth=2, weight_decay=1e-3)
    assert r.info["slim_step"] == "factorize"
    f = factorize(r.model, (x,), rank_ratio=0.25)
    assert f.flops_after < f.flops_before and f.params_after < f.params_before
    replaced = [layer for layer in f.layers if layer.replaced]
    assert replaced
    for layer in replaced:
        assert layer.rel_output_error <= layer.output_error_bound * 1.001 + 1e-5
        assert layer.flops_after < layer.flops_before
    assert f.max_rel_output_diff < 1.0


@pytest.mark.parametrize("option", [{"rank_ratio": 0.3}, {"energy": 0.9}])
def test_conv_factorization_matches_truncation(data, option):
    _, x = data
    model = tiny_cnn().eval()
    f = factorize(model, (x,), **option)
    convs = [layer for layer in f.layers if layer.kind == "conv" and layer.replaced]
    assert convs and f.flops_after < f.flops_before
    # a layer whose truncation drops nothing must reproduce its output; the others stay within the bound
    for layer in f.layers:
        if layer.replaced:
            assert layer.rel_output_error <= layer.output_error_bound * 1.001 + 1e-5
    full = factorize(model, (x,), energy=1.0)
    assert full.max_rel_output_diff < 1e-4
    kept = factorize(model, (x,), **option, min_saving=0.99)
    assert not any(layer.replaced for layer in kept.layers) and kept.flops_after == kept.flops_before


def test_factorize_needs_exactly_one_rank_option(data):
    _, x = data
    with pytest.raises(CompressionError, match="exactly one"):
        factorize(tiny_mlp(), (x,))
