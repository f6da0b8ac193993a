"""A user's own op: without a record it pins what it touches; `register_op` gives it one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimship import SlimmingError, register_op, slim
from slimship.slimming.ops import OPS

NAME = "slimship_test.channel_gain"


@torch.library.custom_op("slimship_test::channel_gain", mutates_args=())
def channel_gain(x: torch.Tensor, gain: float) -> torch.Tensor:
    return x * gain


@channel_gain.register_fake
def _(x: torch.Tensor, gain: float) -> torch.Tensor:
    return torch.empty_like(x)


class GainNet(nn.Module):
    """conv -> a custom op (kept as one node by torch.export) -> relu -> conv -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(torch.ops.slimship_test.channel_gain(self.conv(x), 2.0))
        return self.fc(self.mid(y).mean(dim=(2, 3)))


@pytest.fixture
def model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = GainNet().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model.conv.weight[[1, 5]] = 0
        model.conv.bias[[1, 5]] = 0
    yield model, x
    OPS.pop(NAME, None)


def _check(result, model, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_unknown_op_pins_then_its_record_slims(model) -> None:
    model, x = model
    before = slim(model, x)
    assert NAME in before.report.unsupported_ops
    assert before.model.conv.weight.shape[0] == 8  # the space the custom op touches stays
    _check(before, model, x)

    (record,) = register_op(torch.ops.slimship_test.channel_gain, like="aten.mul")
    assert record.name == NAME and OPS[NAME] is record
    after = slim(model, x)
    assert NAME not in after.report.unsupported_ops
    assert list(after.model.conv.weight.shape) == [6, 3, 3, 3]
    assert list(after.model.mid.weight.shape) == [6, 6, 1, 1]
    _check(after, model, x)


def test_a_record_without_a_value_rule_couples_but_proves_nothing(model) -> None:
    model, x = model
    register_op(NAME, coupling=OPS["aten.mul"].coupling)
    result = slim(model, x)
    assert NAME not in result.report.unsupported_ops
    assert result.model.conv.weight.shape[0] == 8  # free, but nothing proves its channels zero
    _check(result, model, x)


def test_register_op_refuses_bad_records(model) -> None:
    with pytest.raises(SlimmingError, match="coupling rule"):
        register_op(NAME)
    with pytest.raises(SlimmingError, match="no record"):
        register_op(NAME, like="aten.no_such_op")
    with pytest.raises(SlimmingError, match="must be callable"):
        register_op(NAME, like="aten.mul", sizes="view")
    with pytest.raises(SlimmingError, match="have a record already"):
        register_op("aten.relu", like="aten.mul")
    assert OPS["aten.relu"].coupling is OPS["aten.mul"].coupling  # both pointwise; nothing replaced
    assert NAME not in OPS
