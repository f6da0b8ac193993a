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


def test_factorize_finetune_trains_the_thin_model_which_exports_exactly(data, tmp_path):
    import onnxruntime as ort

    train, x = data
    r = compress("lorita", tiny_mlp(), (x,), train, epochs=1, depth=2, weight_decay=1e-3, finetune_epochs=1)
    assert r.info["factorize"]["finetune_epochs"] == 1
    plain = factorize(r.model, (x,), rank_ratio=0.25)
    tuned = factorize(r.model, (x,), rank_ratio=0.25, train=train, finetune_epochs=1, seed=0)
    again = factorize(r.model, (x,), rank_ratio=0.25, train=train, finetune_epochs=1, seed=0)
    assert len(tuned.finetune_history) == 1 and not plain.finetune_history
    assert tuned.flops_after == plain.flops_after < tuned.flops_before
    assert tuned.params_after == plain.params_after
    assert tuned.max_rel_output_diff == plain.max_rel_output_diff  # the truncation, before the fine-tune
    pairs = list(zip(plain.model.state_dict().values(), tuned.model.state_dict().values(), strict=True))
    assert any(not torch.equal(p, t) for p, t in pairs)  # the fine-tune moved the thin layers
    for va, vb in zip(tuned.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(va, vb)  # seeded
    path = tmp_path / "thin.onnx"
    torch.onnx.export(tuned.model.eval(), (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), tuned.model(x), rtol=1e-4, atol=1e-5)


def test_finetune_needs_training_batches(data):
    _, x = data
    with pytest.raises(CompressionError, match="finetune_epochs=2 needs training batches"):
        factorize(tiny_mlp(), (x,), rank_ratio=0.5, finetune_epochs=2)
