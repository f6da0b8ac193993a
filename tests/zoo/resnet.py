"""ResNet basic blocks, bottleneck blocks and a ResNeXt (grouped conv) block."""

from __future__ import annotations

import torch
from torch import nn

from slimship.models import BasicBlock
from tests.zoo._base import ZooCase, image_case, register, seeded


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (optionally grouped), 1x1 expand; 1x1 conv + BN shortcut when shapes change."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetLike(nn.Module):
    def __init__(
        self, blocks: list[nn.Module], stem_width: int, out_width: int, num_classes: int = 7
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU()
        )
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(out_width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def _basic() -> nn.Module:
    blocks = [BasicBlock(8, 8), BasicBlock(8, 16, stride=2), BasicBlock(16, 16)]
    return ResNetLike(blocks, 8, 16)


def _bottleneck() -> nn.Module:
    blocks = [Bottleneck(8, 4, 16), Bottleneck(16, 4, 16), Bottleneck(16, 8, 32, stride=2)]
    return ResNetLike(blocks, 8, 32)


def _resnext() -> nn.Module:
    blocks = [
        Bottleneck(16, 16, 32, groups=4),
        Bottleneck(32, 32, 32, groups=8),
        Bottleneck(32, 32, 48, 2, 8),
    ]
    return ResNetLike(blocks, 16, 48)


@register("resnet_basic")
def resnet_basic() -> ZooCase:
    return image_case("resnet_basic", seeded(_basic, 4), (3, 16, 16), "resnet")


@register("resnet_bottleneck")
def resnet_bottleneck() -> ZooCase:
    return image_case("resnet_bottleneck", seeded(_bottleneck, 5), (3, 16, 16), "resnet")


@register("resnext")
def resnext() -> ZooCase:
    return image_case("resnext", seeded(_resnext, 6), (3, 16, 16), "resnet")
