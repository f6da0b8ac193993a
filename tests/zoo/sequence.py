"""Sequence models: a Conv1d net over (N, C, L) signals and a token-embedding bag classifier."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded, token_case


class Conv1dNet(nn.Module):
    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(4, 16, 5, padding=2, bias=False), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Conv1d(16, 24, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(24, 24, 3, padding=2, dilation=2, groups=4), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class EmbeddingNet(nn.Module):
    """nn.Embedding, mean over tokens, Linear-ReLU-Linear."""

    def __init__(self, vocab: int = 50, dim: int = 16, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 24)
        self.fc2 = nn.Linear(24, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.embed(ids).mean(dim=1))))


@register("conv1d_net")
def conv1d_net() -> ZooCase:
    return image_case("conv1d_net", seeded(Conv1dNet, 18), (4, 32), "sequence")


@register("embedding_net")
def embedding_net() -> ZooCase:
    return token_case("embedding_net", seeded(EmbeddingNet, 19), 50, 10, "sequence")
