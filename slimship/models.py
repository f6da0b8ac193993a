"""Demo and benchmark model definitions for digits-sized inputs (1x8x8, 10 classes).

Every factory is ``fn(**kwargs) -> nn.Module`` with a ``seed`` keyword: the weights depend on the seed
only, and the global torch RNG state is left untouched. ``MODEL_FACTORIES`` maps names to factories
(a config's ``model.factory`` can point at any of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimship.errors import ConfigError

DIGITS_CHANNELS = 1
DIGITS_SIZE = 8
DIGITS_CLASSES = 10


def _check_widths(name: str, values: Sequence[int], min_len: int = 1) -> tuple[int, ...]:
    values = tuple(values)
    if len(values) < min_len or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(
            f"model argument '{name}' must be a sequence of at least {min_len} positive ints, got {values!r}"
        )
    return values


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with a private RNG stream so the caller's torch RNG state is unchanged."""
    if not isinstance(seed, int):
        raise ConfigError(f"model argument 'seed' must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


# ----------------------------------------------------------------------------------------------- CNN


class DigitsCNN(nn.Module):
    """conv3x3-BN-ReLU blocks at 8x8, a 2x2 max-pool to 4x4, one more block, global pool, Linear."""

    def __init__(self, widths: Sequence[int] = (64, 128, 128), num_classes: int = DIGITS_CLASSES) -> None:
        super().__init__()
        widths = _check_widths("widths", widths, min_len=2)
        layers: list[nn.Module] = []
        cin = DIGITS_CHANNELS
        for width in widths[:-1]:
            layers.append(conv_bn_relu(cin, width))
            cin = width
        layers.append(nn.MaxPool2d(2))
        layers.append(conv_bn_relu(cin, widths[-1]))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def digits_cnn(widths: Sequence[int] = (64, 128, 128), seed: int = 0) -> nn.Module:
    """The demo CNN (about 7 MMAC per image at the default widths)."""
    return _seeded(lambda: DigitsCNN(widths), seed)


# --------------------------------------------------------------------------------------------- LeNet


class LeNet5(nn.Module):
    """LeNet-5 adapted to 8x8: padding=2 5x5 convs keep the size, two 2x2 pools give 2x2x16 features."""

    def __init__(self, num_classes: int = DIGITS_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(DIGITS_CHANNELS, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 2 * 2, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def lenet5(seed: int = 0) -> nn.Module:
    return _seeded(LeNet5, seed)


# -------------------------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 conv + BN shortcut when the stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallResNet(nn.Module):
    """Stem conv, one stage of basic blocks per width (stride 2 from the second stage), pool, Linear."""

    def __init__(
        self,
        widths: Sequence[int] = (32, 64),
        blocks: Sequence[int] = (2, 2),
        in_channels: int = DIGITS_CHANNELS,
        num_classes: int = DIGITS_CLASSES,
    ) -> None:
        super().__init__()
        widths = _check_widths("widths", widths)
        blocks = _check_widths("blocks", blocks)
        if len(widths) != len(blocks):
            raise ConfigError(
                f"model arguments 'widths' {widths!r} and 'blocks' {blocks!r} must have the same length"
            )
        self.stem = conv_bn_relu(in_channels, widths[0])
        stages: list[nn.Module] = []
        cin = widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks)):
            stride = 1 if index == 0 else 2
            layers = [BasicBlock(cin, width, stride)]
            layers += [BasicBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def small_resnet(
    widths: Sequence[int] = (32, 64), blocks: Sequence[int] = (2, 2), seed: int = 0
) -> nn.Module:
    return _seeded(lambda: SmallResNet(widths, blocks), seed)


# ----------------------------------------------------------------------------------------------- MLP


def digits_mlp(hidden: Sequence[int] = (256, 256), seed: int = 0) -> nn.Module:
    """Flatten, then Linear-ReLU per hidden width, then a Linear head."""
    hidden = _check_widths("hidden", hidden)

    def build() -> nn.Module:
        layers: list[nn.Module] = [nn.Flatten()]
        cin = DIGITS_CHANNELS * DIGITS_SIZE * DIGITS_SIZE
        for width in hidden:
            layers += [nn.Linear(cin, width), nn.ReLU()]
            cin = width
        layers.append(nn.Linear(cin, DIGITS_CLASSES))
        return nn.Sequential(*layers)

    return _seeded(build, seed)


# ----------------------------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """Multi-head self-attention with explicit q/k/v Linear layers.

    ``kernel="explicit"`` computes softmax(q @ k^T * scale) @ v; ``kernel="sdpa"`` calls
    ``F.scaled_dot_product_attention``. Heads come from a view of the channel dim into (heads, head_dim).
    """

    def __init__(self, dim: int, heads: int, kernel: str = "explicit") -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"model argument 'dim' ({dim}) must be divisible by 'heads' ({heads})")
        if kernel not in ("explicit", "sdpa"):
            raise ConfigError(f"attention kernel must be 'explicit' or 'sdpa', got {kernel!r}")
        self.heads = heads
        self.head_dim = dim // heads
        self.kernel = kernel
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
            out = weights @ v
        out = out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.proj(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, kernel: str = "explicit") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, kernel)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch-embedding conv, class token, learned position embedding, blocks, LayerNorm, head on cls."""

    def __init__(
        self,
        image_size: int = DIGITS_SIZE,
        in_channels: int = DIGITS_CHANNELS,
        num_classes: int = DIGITS_CLASSES,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        patch: int = 2,
        kernel: str = "explicit",
    ) -> None:
        super().__init__()
        if patch <= 0 or image_size % patch:
            raise ConfigError(f"model argument 'patch' ({patch}) must divide the image size ({image_size})")
        _check_widths("dim/depth/heads/mlp_ratio", (dim, depth, heads, mlp_ratio))
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, mlp_ratio, kernel) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def digits_vit(
    dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4, patch: int = 2, seed: int = 0
) -> nn.Module:
    return _seeded(
        lambda: VisionTransformer(dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, patch=patch), seed
    )


MODEL_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    "lenet5": lenet5,
    "small_resnet": small_resnet,
    "digits_mlp": digits_mlp,
    "digits_vit": digits_vit,
}
