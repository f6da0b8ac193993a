"""Linear-only nets: a plain MLP, and a two-head net returning a tuple of two tensors."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (20, 32, 24, 5)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(sizes):
            layers += [nn.Linear(cin, cout), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TwoHeadNet(nn.Module):
    """Shared conv trunk, a classification head and a regression head; returns (logits, box)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.cls = nn.Linear(16, 5)
        self.box = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.trunk(x).mean(dim=(2, 3))
        return self.cls(feat), self.box(feat)


@register("mlp")
def mlp() -> ZooCase:
    return image_case("mlp", seeded(MLP, 20), (20,), "mlp")


@register("multi_output")
def multi_output() -> ZooCase:
    return image_case("multi_output", seeded(TwoHeadNet, 21), (3, 12, 12), "mlp")
