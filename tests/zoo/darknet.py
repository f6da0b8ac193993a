"""DarkNet (timm's darknet17): Conv + BatchNorm + in-place LeakyReLU blocks with residual adds."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.1, inplace=True),
    )


class DarkBlock(nn.Module):
    """1x1 squeeze, 3x3 expand, added in place onto the input (`x += shortcut`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(channels, channels // 2, 1)
        self.conv2 = conv_bn_act(channels // 2, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        y += x
        return y


class DarkNetLike(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = conv_bn_act(3, 16, 3)
        self.stage1 = nn.Sequential(conv_bn_act(16, 24, 3, stride=2), DarkBlock(24))
        self.stage2 = nn.Sequential(conv_bn_act(24, 32, 3, stride=2), DarkBlock(32), DarkBlock(32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage2(self.stage1(self.stem(x)))
        return self.fc(y.mean(dim=(2, 3)))


@register("darknet_like")
def darknet_like() -> ZooCase:
    return image_case("darknet_like", seeded(DarkNetLike, 32), (3, 16, 16), "darknet")
