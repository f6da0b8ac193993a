"""Convolutions whose weights are computed in forward: BiT's weight standardisation (timm's
StdConv2d, a batch_norm over the weight) behind BiT's padded stem, and the older (w - mean) / std form.

A standardised conv's statistics run over its input channels, so only the spaces that plain layers
consume can shrink: here the output of the last standardised convs, read by the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class BatchNormStdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT ResNetV2): each output row standardised by batch_norm in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-8).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdMeanConv2d(nn.Conv2d):
    """Weight standardisation as (w - mean) / (std + eps), from torch.std_mean over each row."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std, mean = torch.std_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        weight = (self.weight - mean) / (std + 1e-6)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class PreActBottleneck(nn.Module):
    """BiT's block: GroupNorm + ReLU first, then 1x1, 3x3, 1x1 standardised convs; a projected shortcut."""

    def __init__(self, cin: int, mid: int, cout: int, conv: type[nn.Conv2d]) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.GroupNorm(4, cin), nn.GroupNorm(4, mid), nn.GroupNorm(4, mid)
        self.conv1 = conv(cin, mid, 1, bias=False)
        self.conv2 = conv(mid, mid, 3, padding=1, bias=False)
        self.conv3 = conv(mid, cout, 1, bias=False)
        self.downsample = conv(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x))
        y = self.conv1(pre)
        y = self.conv2(F.relu(self.norm2(y)))
        y = self.conv3(F.relu(self.norm3(y)))
        return y + self.downsample(pre)


class BitLike(nn.Module):
    """BiT's fixed stem (standardised conv, ConstantPad2d(1, 0), 3x3/2 max pool), one pre-activation
    bottleneck, a final GroupNorm + ReLU, global pool and a plain head."""

    def __init__(self, conv: type[nn.Conv2d], num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv(3, 16, 3, stride=2, bias=False), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2)
        )
        self.block = PreActBottleneck(16, 8, 24, conv)
        self.norm = nn.GroupNorm(4, 24)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm(self.block(self.stem(x))))
        return self.head(y.mean(dim=(2, 3)))


@register("bit_like")
def bit_like() -> ZooCase:
    return image_case("bit_like", seeded(lambda: BitLike(BatchNormStdConv2d), 30), (3, 20, 20), "reparam")


@register("std_mean_bit_like")
def std_mean_bit_like() -> ZooCase:
    return image_case("std_mean_bit_like", seeded(lambda: BitLike(StdMeanConv2d), 31), (3, 20, 20), "reparam")
