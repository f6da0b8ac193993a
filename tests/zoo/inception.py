"""Inception-style blocks: parallel branches of different widths concatenated along channels."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


def _conv_bn(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout))


class InceptionBlock(nn.Module):
    """1x1, 1x1->3x3, 1x1->5x5 and pool->1x1 branches of widths 4, 6, 3 and 5, concatenated."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = _conv_bn(cin, 4, 1)
        self.b3 = nn.Sequential(_conv_bn(cin, 5, 1), nn.ReLU(), _conv_bn(5, 6, 3))
        self.b5 = nn.Sequential(_conv_bn(cin, 2, 1), nn.ReLU(), _conv_bn(2, 3, 5))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), _conv_bn(cin, 5, 1))
        self.out_channels = 4 + 6 + 3 + 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b1(x), self.b3(x), self.b5(x), self.pool(x)]
        return torch.relu(torch.cat(branches, dim=1))


class InceptionNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 8, 3), nn.ReLU())
        self.block1 = InceptionBlock(8)
        self.block2 = InceptionBlock(self.block1.out_channels)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


@register("inception")
def inception() -> ZooCase:
    return image_case("inception", seeded(InceptionNet, 30), (3, 10, 10), "inception")
