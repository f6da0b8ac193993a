"""Nets normalised with GroupNorm and with InstanceNorm."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class GroupNormNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU(),
            nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.GroupNorm(8, 24), nn.SiLU(),
            nn.Conv2d(24, 24, 3, padding=1), nn.GroupNorm(1, 24), nn.SiLU(),
        )  # fmt: skip
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class InstanceNormNet(nn.Module):
    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.InstanceNorm2d(12, affine=True), nn.LeakyReLU(0.1),
            nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.InstanceNorm2d(16), nn.LeakyReLU(0.1),
        )  # fmt: skip
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).amax(dim=(2, 3)))


@register("groupnorm_net")
def groupnorm_net() -> ZooCase:
    return image_case("groupnorm_net", seeded(GroupNormNet, 15), (3, 12, 12), "norms")


@register("instancenorm_net")
def instancenorm_net() -> ZooCase:
    return image_case("instancenorm_net", seeded(InstanceNormNet, 16), (3, 12, 12), "norms")
