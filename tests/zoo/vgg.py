"""VGG with BatchNorm; the classifier flattens C x H x W into a Linear (no global pool)."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class VGGBN(nn.Module):
    def __init__(self, cfg: tuple = (8, "M", 16, 16, "M", 24), num_classes: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
                cin = item
        self.features = nn.Sequential(*layers)
        # 16x16 input, two pools -> 4x4: the first Linear sees 24 * 4 * 4 features.
        self.classifier = nn.Sequential(
            nn.Linear(cin * 4 * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register("vgg_bn")
def vgg_bn() -> ZooCase:
    return image_case("vgg_bn", seeded(VGGBN, 3), (3, 16, 16), "vgg")
