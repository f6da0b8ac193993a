"""UNet-style net: two downsamplings, a ConvTranspose2d and an F.interpolate up path, skip concats."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.enc1 = double_conv(3, 8)
        self.enc2 = double_conv(8, 16)
        self.bottom = double_conv(16, 24)
        self.up1 = nn.ConvTranspose2d(24, 16, 2, stride=2)
        self.dec1 = double_conv(16 + 16, 16)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.dec2 = double_conv(8 + 8, 8)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d1 = self.dec1(torch.cat([self.up1(b), e2], dim=1))
        up = F.interpolate(self.reduce(d1), scale_factor=2.0, mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, e1], dim=1))
        return self.out(d2)


@register("unet")
def unet() -> ZooCase:
    return image_case("unet", seeded(UNet, 14), (3, 16, 16), "unet")
