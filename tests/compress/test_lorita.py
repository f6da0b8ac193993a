"""LoRITa: factor over-parametrisation, collapse, and SVD factorisation checked against its bound."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimship.compress import compress, parametrize_low_rank
from slimship.compress.lorita import collapse, factorize, overparametrize
from slimship.data import Batches, digits_arrays
from slimship.errors import CompressionError
from tests.compress.gloo import single_process_group
from tests.compress.test_base import same_state
from tests.compress.test_sparsifier import run_readme_example


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


# ---- the user-loop pieces: parametrize_low_rank and its factorisation ------------------------------
def _own_loop(model: nn.Module, train, epochs: int) -> None:
    """What a user writes: Adam with weight decay over the (parametrised) model, seeded as train_loop."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-3)
    torch.manual_seed(0)
    model.train()
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for x, y in train:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()


def test_user_loop_parametrise_train_factorise(data):
    """parametrise -> own loop -> factorise: the same collapsed model as compress("lorita") (one
    implementation); each thin pair is the rank-r truncation of its collapsed weight (spectral error
    sigma_{r+1}); fewer parameters, and the thin model's outputs stay close to the collapsed model's."""
    train, x = data
    model = tiny_mlp()
    lowrank = parametrize_low_rank(model, depth=2)
    assert lowrank.layers == ["1", "3", "5"] and lowrank.model is model
    _own_loop(model, train, epochs=2)
    via_compress = compress("lorita", tiny_mlp(), (x,), train, epochs=2, depth=2, weight_decay=1e-3)
    collapsed = collapse(copy.deepcopy(model))
    assert same_state(collapsed, via_compress.model)
    assert lowrank.effective_ranks(0.98) == via_compress.info["effective_rank"]
    result = lowrank.factorize((x,), rank_ratio=0.25)
    assert all(parametrize.is_parametrized(model.get_submodule(n), "weight") for n in lowrank.layers)
    assert same_state(collapse(copy.deepcopy(model)), collapsed)  # factorize left the model unchanged
    assert result.params_after < result.params_before
    replaced = [layer for layer in result.layers if layer.replaced]
    assert replaced
    for layer in replaced:
        w = collapsed.get_submodule(layer.name).weight.detach().double()
        first, second = result.model.get_submodule(layer.name)
        thin = second.weight.detach().double() @ first.weight.detach().double()
        sigma = torch.linalg.svdvals(w)
        assert torch.linalg.matrix_rank(thin) == layer.rank < len(sigma)
        torch.testing.assert_close(
            torch.linalg.matrix_norm(w - thin, ord=2), sigma[layer.rank], rtol=1e-4, atol=1e-6
        )
    seen = _layer_inputs(collapsed, [layer.name for layer in replaced], x)
    for layer in replaced:  # on its inputs, each thin pair is within the spectral bound of what it drops
        dense, thin = collapsed.get_submodule(layer.name), result.model.get_submodule(layer.name)
        with torch.no_grad():
            err = float((thin(seen[layer.name]) - dense(seen[layer.name])).double().norm())
        sigma = torch.linalg.svdvals(dense.weight.detach().double())
        assert err <= float(sigma[layer.rank]) * float(seen[layer.name].double().norm()) * (1 + 1e-4)
    with torch.no_grad():
        ref, got = collapsed(x), result.model(x)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert rel == pytest.approx(result.max_rel_output_diff, rel=1e-3, abs=1e-6)


def test_factorize_leaves_the_model_parametrised_and_trainable(data):
    """lowrank.factorize works on a copy: the user's model keeps its factors, its train mode and its
    outputs; the optimizer built on the factors still changes the effective weight, and a second
    factorize sees that training. collapse() is the destructive step that ends the run."""
    train, x = data
    model = tiny_mlp()
    lowrank = parametrize_low_rank(model, depth=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = model(x)
    first = lowrank.factorize((x,), rank_ratio=0.5)
    assert model.training
    assert all(parametrize.is_parametrized(model.get_submodule(n), "weight") for n in lowrank.layers)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    weight = model.get_submodule("1").weight.detach().clone()
    for xb, yb in train:  # the optimizer built before factorize still drives the model
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert not torch.equal(model.get_submodule("1").weight.detach(), weight)
    second = lowrank.factorize((x,), rank_ratio=0.5)
    with torch.no_grad():
        assert not torch.equal(second.model(x), first.model(x))
    lowrank.collapse()
    assert not any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def _layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, args[0].detach())

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_parametrise_before_ddp_then_factorise_the_wrapper(data, tmp_path):
    """The parametrisation refuses a DDP wrapper (DDP keeps the parameters it was built with); applied
    before wrapping it trains under DDP, and factorize / collapse unwrap the wrapper."""
    train, x = data
    with single_process_group(tmp_path):
        with pytest.raises(CompressionError, match="parametrise the plain model first"):
            parametrize_low_rank(nn.parallel.DistributedDataParallel(tiny_mlp()))
        model = tiny_mlp()
        lowrank = parametrize_low_rank(model, depth=2)
        ddp = nn.parallel.DistributedDataParallel(model)
        before = collapse(copy.deepcopy(model)).state_dict()
        _own_loop(ddp, train, epochs=1)
        result = factorize(ddp, (x,), rank_ratio=0.5)
        assert result.params_after < result.params_before
        collapse(ddp)
        assert lowrank.layers == ["1", "3", "5"]
        assert not any("parametrizations" in n for n, _ in model.named_parameters())
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
        del ddp  # a DDP reducer must not outlive its process group (its teardown then hangs)


def test_factors_follow_the_model_dtype(data):
    """The factors and the thin layers are made on the weight's device and in its dtype (float64 here)."""
    _, x = data
    model = tiny_cnn().double()
    lowrank = parametrize_low_rank(model, depth=3)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    result = lowrank.factorize((x.double(),), energy=0.9)
    assert any(layer.replaced for layer in result.layers)
    assert all(p.dtype == torch.float64 for p in result.model.parameters())
    assert result.model(x.double()).dtype == torch.float64


@pytest.mark.parametrize(
    ("model", "options", "named"),
    [
        (tiny_mlp, {"depth": 1}, "option 'depth'"),
        (tiny_mlp, {"depth": 2.5}, "option 'depth'"),
        (lambda: nn.Sequential(nn.ReLU()), {}, "no Linear or ungrouped convolution"),
    ],
)
def test_parametrize_names_bad_options(model, options, named):
    with pytest.raises(CompressionError, match=named):
        parametrize_low_rank(model(), **options)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda x: parametrize_low_rank("model"), r"parametrize_low_rank model must be a torch nn\.Module"),
        (lambda x: factorize("model", (x,), rank_ratio=0.5), r"factorize model must be a torch nn\.Module"),
        (lambda x: factorize(tiny_mlp(), (x,), rank_ratio="half"), "option 'rank_ratio' must be a number in"),
        (lambda x: factorize(tiny_mlp(), (x,), energy=0.9, min_saving="a"), "min_saving must be a number in"),
        (lambda x: factorize(tiny_mlp(), (x,), energy=0.9, finetune_epochs=1.5), "'finetune_epochs' must be"),
    ],
)
def test_lorita_entry_points_name_bad_arguments(call, named, data):
    with pytest.raises(CompressionError, match=named):
        call(data[1])


def test_parametrize_twice_is_refused_and_effective_ranks_checks_energy():
    lowrank = parametrize_low_rank(tiny_mlp(), depth=2)
    with pytest.raises(CompressionError, match="layer '1' is already parametrised"):
        parametrize_low_rank(lowrank.model)
    with pytest.raises(CompressionError, match="option 'energy'"):
        lowrank.effective_ranks(1.5)


def test_factorize_leaves_a_parametrised_model_working(data):
    """factorize collapses a copy; the caller's parametrised model (sharing torch's injected class with
    that copy) keeps its factors and its outputs."""
    _, x = data
    model = tiny_mlp().eval()
    parametrize_low_rank(model, depth=3)
    with torch.no_grad():
        ref = model(x)
    result = factorize(model, (x,), rank_ratio=0.5)
    assert any(layer.replaced for layer in result.layers)
    assert sum("parametrizations" in n for n, _ in model.named_parameters()) == 9  # 3 layers x 3 factors
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_readme_lorita_example_runs(tmp_path):
    """README "LoRITa in your own loop" runs as written: fewer parameters, accuracy far above chance (10%)."""
    stdout = run_readme_example("### LoRITa in your own loop", tmp_path)
    found = re.search(r"params (\d+) -> (\d+) accuracy ([\d.]+)", stdout)
    assert found, stdout
    before, after, accuracy = int(found[1]), int(found[2]), float(found[3])
    assert after < before and accuracy > 0.6
