"""Random CNNs composed from common blocks, for property tests (slimming must keep outputs identical).

``build_random_net(seed, depth)`` is deterministic in (seed, depth); ``random_nets()`` is a hypothesis
strategy over it.
"""

from __future__ import annotations

import random

import torch
from hypothesis import strategies as st
from torch import nn

from tests.zoo._base import ZooCase, image_case, seeded

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU)
IN_CHANNELS = 3
IMAGE_SIZE = 16


def _conv_bn_act(cin: int, cout: int, kernel: int, act: type[nn.Module], groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(),
    )


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__(*_conv_bn_act(cin, cout, rng.choice((1, 3)), rng.choice(ACTIVATIONS)))


class ResidualBlock(nn.Module):
    """Two conv-BN layers added to the input (1x1 conv + BN projection when widths differ)."""

    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__()
        mid = rng.randint(4, 16)
        self.body = nn.Sequential(
            _conv_bn_act(cin, mid, 3, rng.choice(ACTIVATIONS)),
            nn.Conv2d(mid, cout, 3, padding=1, bias=rng.random() < 0.5),
            nn.BatchNorm2d(cout),
        )
        self.proj = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout))
        )
        self.act = rng.choice(ACTIVATIONS)()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.proj(x))


class ConcatBlock(nn.Module):
    """Two branches of different widths concatenated on channels (total ``cout``)."""

    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__()
        left = rng.randint(1, cout - 1)
        self.a = _conv_bn_act(cin, left, 1, rng.choice(ACTIVATIONS))
        self.b = _conv_bn_act(cin, cout - left, 3, rng.choice(ACTIVATIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DepthwiseBlock(nn.Sequential):
    """Depthwise 3x3 conv-BN-act, then pointwise conv-BN-act."""

    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__(
            _conv_bn_act(cin, cin, 3, rng.choice(ACTIVATIONS), groups=cin),
            _conv_bn_act(cin, cout, 1, rng.choice(ACTIVATIONS)),
        )


class SEBlock(nn.Module):
    """Squeeze-excite gate on ``cin`` channels (keeps the width)."""

    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__()
        squeeze = rng.randint(2, max(2, cin // 2))
        self.fc1 = nn.Conv2d(cin, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.gate = rng.choice((nn.Sigmoid, nn.Hardsigmoid))()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        return x * self.gate(self.fc2(torch.relu(self.fc1(scale))))


class PoolBlock(nn.Sequential):
    """2x2 max or average pool (keeps the width, halves the size)."""

    def __init__(self, cin: int, cout: int, rng: random.Random) -> None:
        super().__init__(rng.choice((nn.MaxPool2d, nn.AvgPool2d))(2))


BLOCKS: dict[str, type[nn.Module]] = {
    "conv": ConvBlock,
    "residual": ResidualBlock,
    "concat": ConcatBlock,
    "depthwise": DepthwiseBlock,
    "se": SEBlock,
    "pool": PoolBlock,
}
KEEPS_WIDTH = {"se", "pool"}


class RandomNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], width: int, num_classes: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def plan_blocks(seed: int, depth: int) -> tuple[list[tuple[str, int, int]], int]:
    """The block kinds with (cin, cout) and the class count, drawn from ``seed``."""
    rng = random.Random(seed)
    plan: list[tuple[str, int, int]] = []
    width, size = IN_CHANNELS, IMAGE_SIZE
    for index in range(depth):
        kinds = list(BLOCKS) if index else ["conv"]  # start from a conv so the width leaves the input's 3
        if size < 4:
            kinds.remove("pool")
        kind = rng.choice(kinds)
        cout = width if kind in KEEPS_WIDTH else rng.randint(4, 24)
        plan.append((kind, width, cout))
        width = cout
        size //= 2 if kind == "pool" else 1
    return plan, rng.randint(2, 10)


def build_random_net(seed: int, depth: int) -> ZooCase:
    """A valid random CNN of ``depth`` blocks on (2, 3, 16, 16) inputs, ending in global pool + Linear."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    plan, num_classes = plan_blocks(seed, depth)

    def build() -> nn.Module:
        rng = random.Random(seed + 1)
        blocks = [BLOCKS[kind](cin, cout, rng) for kind, cin, cout in plan]
        return RandomNet(blocks, plan[-1][2], num_classes)

    case = image_case(
        f"random_s{seed}_d{depth}", seeded(build, seed), (IN_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), "random"
    )
    case.notes = " -> ".join(f"{kind}({cin}->{cout})" for kind, cin, cout in plan)
    return case


def random_nets(max_seed: int = 100_000, max_depth: int = 6) -> st.SearchStrategy[ZooCase]:
    """Hypothesis strategy drawing (seed, depth) and building the random net."""
    return st.builds(build_random_net, seed=st.integers(0, max_seed), depth=st.integers(1, max_depth))
