"""Ops the tables used to miss: padding, weights computed in the graph (standardised, weight-normed)
and in-place activations. Each small model slims exactly with real removals; padding that touches the
channel dim pins it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimship import slim, zero_random_groups
from slimship.slimming.graph import op_name
from tests.zoo import build
from tests.zoo.reparam import BatchNormStdConv2d, StdMeanConv2d


class MeanVarConv2d(nn.Conv2d):
    """Weight standardisation written with mean and var (diffusion UNets' WeightStandardizedConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class NormedConv2d(nn.Conv2d):
    """Weight norm written by hand: w = gain * v / ||v|| (EDM's and StyleGAN's normalised weights)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.weight, dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, self.gain * self.weight / norm, self.bias, self.stride, self.padding)


def weight_normed_conv(*args, **kwargs) -> nn.Module:
    return nn.utils.parametrizations.weight_norm(nn.Conv2d(*args, **kwargs))


class Head(nn.Module):
    """conv (of the kind under test) -> relu -> [pad] -> conv -> mean -> linear."""

    def __init__(self, conv: type | object, pad: tuple[int, ...] = (), mode: str = "constant") -> None:
        super().__init__()
        self.conv = conv(3, 8, 3, padding=1)
        self.pad, self.mode = pad, mode
        extra = 2 if len(pad) == 6 else 0  # a pad of the channel dim adds 2 channels
        self.mid = nn.Conv2d(8 + extra, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        if self.pad:
            y = F.pad(y, self.pad, mode=self.mode)
        return self.fc(self.mid(y).mean(dim=(2, 3)))


def _zero_rows(model: Head, rows: list[int]) -> None:
    """Zero output rows of the first conv: its raw weight rows (or a weight norm's magnitudes)."""
    with torch.no_grad():
        conv = model.conv
        if hasattr(conv, "parametrizations"):
            conv.parametrizations.weight.original0[rows] = 0  # g: the magnitudes
        elif hasattr(conv, "gain"):
            conv.gain[rows] = 0
        else:
            conv.weight[rows] = 0
        conv.bias[rows] = 0


def _slim_exactly(model: nn.Module, x: torch.Tensor):
    result = slim(model, x)
    assert result.report.verification.passed and not result.report.excluded_spaces
    assert not result.report.unsupported_ops and not result.report.unreadable
    with torch.no_grad():
        for inputs in (x, torch.randn(x.shape, generator=torch.Generator().manual_seed(3))):
            torch.testing.assert_close(result.model(inputs), model(inputs), rtol=1e-5, atol=1e-6)
    return result


def _first_weight_of(conv: nn.Module) -> torch.Tensor:
    return conv.parametrizations.weight.original1 if hasattr(conv, "parametrizations") else conv.weight


def _first_weight(model: nn.Module) -> torch.Tensor:
    return _first_weight_of(model.conv)


@pytest.mark.parametrize(
    "conv", [BatchNormStdConv2d, StdMeanConv2d, MeanVarConv2d, weight_normed_conv, NormedConv2d]
)
def test_zero_rows_of_a_computed_weight_are_removed(conv) -> None:
    torch.manual_seed(0)
    model, x = Head(conv).eval(), torch.randn(2, 3, 8, 8)
    _zero_rows(model, [1, 5])
    result = _slim_exactly(model, x)
    assert _first_weight(result.model).shape[0] == 6
    assert result.model.mid.weight.shape[1] == 6


@pytest.mark.parametrize("conv", [weight_normed_conv, NormedConv2d])
def test_weight_norm_drops_zero_input_columns_only(conv) -> None:
    """A weight norm's norm runs over its input columns: a zero column can go, a live one cannot."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), conv(8, 6, 1)).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model[0].weight[[2, 3, 7]] = 0
        model[0].bias[[2, 3, 7]] = 0
        _first_weight_of(model[2])[:, [2, 3]] = 0  # column 7 stays in the norm
    result = _slim_exactly(model, x)
    assert result.model.get_submodule("0").weight.shape[0] == 6  # 2 and 3 go, 7 stays
    assert _first_weight_of(result.model.get_submodule("2")).shape[1] == 6


def test_spatial_padding_keeps_channels_removable() -> None:
    torch.manual_seed(0)
    model, x = Head(nn.Conv2d, pad=(1, 1, 2, 0)).eval(), torch.randn(2, 3, 8, 8)
    _zero_rows(model, [0, 4, 6])
    result = _slim_exactly(model, x)
    assert result.model.conv.weight.shape[0] == 5 and result.model.mid.weight.shape[1] == 5


@pytest.mark.parametrize("mode", ["reflect", "replicate"])
def test_copying_padding_keeps_a_constant_channel_foldable(mode: str) -> None:
    """Reflect and replicate padding copy a constant channel (it folds into `mid`'s bias); constant
    padding with 0 would not keep it constant."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for pad_mode, channels in ((mode, 7), ("constant", 8)):
        model = Head(nn.Conv2d, pad=(1, 1, 1, 1), mode=pad_mode).eval()
        with torch.no_grad():
            model.conv.weight[[2]] = 0
            model.conv.bias[[2]] = 0.5  # relu(0.5): a constant channel
        result = _slim_exactly(model, x)
        assert result.model.conv.weight.shape[0] == channels, pad_mode


def test_padding_the_channel_dim_pins_it() -> None:
    torch.manual_seed(0)
    model, x = Head(nn.Conv2d, pad=(0, 0, 0, 0, 1, 1)).eval(), torch.randn(2, 3, 8, 8)
    _zero_rows(model, [0, 4, 6])
    result = slim(model, x)
    assert result.model.conv.weight.shape[0] == 8  # the zero channels stay: padding shifts them
    reasons = {reason for space in result.report.spaces for reason in space.kept}
    assert any("pads this dim" in reason for reason in reasons), reasons
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-6)


def test_in_place_ops_read_their_functional_record() -> None:
    """timm's darknet17 slimmed nothing while aten.leaky_relu_ had no rule; now it reads leaky_relu's."""
    case = build("darknet_like")
    assert zero_random_groups(case.model, case.example_inputs, fraction=0.4, seed=0) > 0
    result = slim(case.model, case.example_inputs)
    in_place = {op_name(n) for n in result.model.graph.nodes if n.op == "call_function"}
    assert {"aten.leaky_relu_", "aten.add_"} <= in_place
    assert not result.report.unsupported_ops
    assert result.params_after < result.params_before
    with torch.no_grad():
        inputs = case.random_inputs(torch.Generator().manual_seed(4))
        torch.testing.assert_close(result.model(*inputs), case.model(*inputs), rtol=1e-5, atol=1e-6)
