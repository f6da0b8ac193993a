"""Behaviour of the slimming engine beyond the zoo: folding, pinning, reports, saving, apply_to."""

from __future__ import annotations

import torch
from torch import nn

from slimship import find_groups, slim, zero_random_groups
from slimship.slimming import count_flops


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def test_dense_model_is_left_unchanged() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    result = slim(model, x)
    assert result.params_after == result.params_before
    assert torch.allclose(result.model(x), model(x))


def test_constant_channels_fold_into_the_next_linear() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[3].weight[:5] = 0  # conv rows zero, but BN beta makes the channels a non-zero constant
        model[3].bias[:5] = 0
        model[4].bias[:5] = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])
        model[4].running_mean[:5] = 0.3
    result = slim(model, x)
    space = next(s for s in result.report.spaces if s.name == "3.weight[0]")
    assert space.channels_after == 11
    assert result.model.state_dict()["8.weight"].shape == (5, 11)
    expected = model(x)
    assert torch.allclose(result.model(x), expected, atol=1e-5)


def test_constant_channels_before_padded_conv_stay_and_are_reported() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
        model[1].bias[:3] = torch.tensor([1.0, 2.0, 3.0])  # distinct constants into a zero-padded 3x3 conv
    result = slim(model, x)
    space = next(s for s in result.report.spaces if s.name == "0.weight[0]")
    assert space.channels_after == 8
    assert any("not provably" in reason for reason in space.kept)


def test_unknown_op_pins_its_channels_and_is_reported() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            y = torch.flip(y, dims=[1])  # no rule for flip: its channels must stay
            return self.head(y)

    model, x = Odd().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        model.conv.weight[:4] = 0
        model.conv.bias[:4] = 0
    result = slim(model, x)
    assert "aten.flip" in result.report.unsupported_ops
    assert result.params_after == result.params_before
    assert torch.allclose(result.model(x), model(x))


def test_slim_model_saves_as_pt2_and_reloads(tmp_path) -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    result = slim(model, x)
    program = torch.export.export(result.model, (x,), strict=False)
    path = tmp_path / "slim.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_dynamic_batch_is_kept() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    result = slim(model, x)
    assert result.dynamic_batch
    big = torch.randn(7, 3, 6, 6)
    assert torch.allclose(result.model(big), model(big), atol=1e-5)


def test_slim_model_can_be_fine_tuned() -> None:
    model, x = _cnn(), torch.randn(4, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    slim_model = slim(model, x).model
    optimizer = torch.optim.SGD(slim_model.parameters(), lr=0.1)
    target = torch.randint(0, 5, (4,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(slim_model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_apply_to_writes_slim_weights_into_the_users_modules() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    expected = model(x)
    result = slim(model, x)
    result.apply_to(model, x)
    assert model[0].out_channels == model[0].weight.shape[0] < 8
    assert model[1].num_features == model[0].out_channels
    assert model[8].in_features == model[8].weight.shape[1]
    assert torch.allclose(model(x), expected, atol=1e-5)
    assert count_flops(model, (x,)) == result.flops_after


def test_find_groups_names_match_the_model() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    found = find_groups(model, x)
    names = dict(model.named_parameters()) | dict(model.named_buffers())
    assert sorted(found.by_space) == ["0.weight[0]", "3.weight[0]"]
    assert len(found.by_space["3.weight[0]"]) == 16
    for group in found.groups:
        for name, _dim, _pos in group.produce + group.consume + group.stats:
            assert name in names
    first = found.groups[found.by_space["0.weight[0]"][0]]
    assert ("0.weight", 0, (0,)) in first.produce
    assert ("3.weight", 1, (0,)) in first.consume
    assert ("1.running_var", 0, (0,)) in first.stats


def test_equal_constant_channels_merge_even_before_a_padded_conv() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[0].bias[:3] = 0
        model[1].bias[:3] = 1.0  # three channels equal to the same constant: merged, not folded
    result = slim(model, x)
    space = next(s for s in result.report.spaces if s.name == "0.weight[0]")
    assert (space.channels_after, space.merged) == (6, 2)
    assert torch.allclose(result.model(x), model(x), atol=1e-5)


def test_channel_multiple_rounds_kept_channels_up() -> None:
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[3].weight[:7] = 0
        model[3].bias[:7] = 0
        model[4].weight[:7] = 0
        model[4].bias[:7] = 0
    plain = slim(model, x)
    aligned = slim(model, x, channel_multiple=4)
    space = {s.name: s for s in plain.report.spaces}["3.weight[0]"]
    aligned_space = {s.name: s for s in aligned.report.spaces}["3.weight[0]"]
    assert space.channels_after == 9
    assert aligned_space.channels_after == 12
    assert any("alignment" in reason for reason in aligned_space.kept)
    assert torch.allclose(aligned.model(x), model(x), atol=1e-5)


class _NaNWhere(nn.Module):
    """Wraps a model; its output is NaN in the rows where `rows` is True (or finite where the model's is)."""

    def __init__(self, model: nn.Module, rows: list[bool] | None = None, value: float = float("nan")) -> None:
        super().__init__()
        self.model, self.rows, self.value = model, rows, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.rows is None:
            return torch.nan_to_num(out, nan=self.value)
        mask = torch.tensor(self.rows[: out.shape[0]] + [False] * max(0, out.shape[0] - len(self.rows)))
        return torch.where(mask[:, None], torch.full_like(out, self.value), out)


def test_verification_fails_on_finite_to_nan_and_nan_to_finite() -> None:
    from slimship.slimming import verify_outputs

    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    to_nan = verify_outputs(model, _NaNWhere(model, [False, True]), (x,), n_random=0)
    assert not to_nan.passed and "NaN at 5 positions where the reference is a number" in to_nan.reason
    nan_model = _NaNWhere(model, [True, False])
    back = verify_outputs(nan_model, _NaNWhere(nan_model, value=0.0), (x,), n_random=0)
    assert not back.passed and "a number at 5 positions where the reference is NaN" in back.reason
    same = verify_outputs(nan_model, _NaNWhere(model, [True, False]), (x,), n_random=1)
    assert same.passed and same.reason == ""


def test_slim_raises_when_the_rewrite_yields_nan(monkeypatch) -> None:
    """A rewrite that poisons a weight with NaN used to verify: max(0.0, nan) is 0.0."""
    import pytest

    from slimship.errors import VerificationError
    from slimship.slimming import api
    from slimship.slimming.graph import get_tensor

    real_rewrite = api.rewrite

    def poisoned(graph, plan):
        new = real_rewrite(graph, plan)
        name = next(n for n in sorted(new) if n.endswith("weight"))
        with torch.no_grad():
            get_tensor(graph.gm, name).fill_(float("nan"))
        return new

    monkeypatch.setattr(api, "rewrite", poisoned)
    model, x = _cnn(), torch.randn(2, 3, 6, 6)
    zero_random_groups(model, x, fraction=0.5, seed=0)
    with pytest.raises(VerificationError, match=r"NaN at \d+ positions where the reference is a number"):
        slim(model, x)


def test_a_forward_failing_without_a_message_is_named_not_an_index_error() -> None:
    """An exception without a message (str(exc) == '') still gives a one-line SlimmingError."""
    import pytest

    from slimship.errors import SlimmingError
    from slimship.slimming import slim

    class Asserts(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[1] != 3:
                raise ValueError
            return self.fc(x)

    with pytest.raises(SlimmingError, match="could not trace Asserts: ValueError"):
        slim(Asserts(), (torch.randn(2, 4),))
