"""A net where one conv module (one set of weights) is applied twice."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class SharedConvNet(nn.Module):
    def __init__(self, width: int = 12, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.shared = nn.Conv2d(width, width, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(width)
        self.bn_b = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn_a(self.shared(x)))
        x = torch.relu(self.bn_b(self.shared(x)))  # same weights, second use
        return self.fc(x.mean(dim=(2, 3)))


@register("shared_weights")
def shared_weights() -> ZooCase:
    return image_case("shared_weights", seeded(SharedConvNet, 17), (3, 10, 10), "shared")
