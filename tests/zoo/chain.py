"""Plain conv chains: conv-ReLU x3 + global pool + Linear, and conv-without-bias + BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class PlainConvNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (8, 16, 16), num_classes: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for width in widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class ConvBNNet(nn.Module):
    """Conv(bias=False) + BatchNorm + ReLU blocks, one strided, then pool + Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


@register("plain_conv")
def plain_conv() -> ZooCase:
    return image_case("plain_conv", seeded(PlainConvNet, 1), (3, 12, 12), "chain")


@register("conv_nobias_bn")
def conv_nobias_bn() -> ZooCase:
    return image_case("conv_nobias_bn", seeded(ConvBNNet, 2), (3, 12, 12), "chain")
