"""Tiny replicas of outside model layouts that once broke ONNX surgery: ViT, DeiT, Swin, PoolFormer.

They follow the tensor layouts of the public implementations (timm) op for op where it matters to
export: 3-D token Linears, heads reshaped and permuted, 6-D window partitions, rolls, gathered position
biases, strided patch merging, GroupNorm(1, C) and pooling token mixers. Random init, tiny sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm's Attention: qkv Linear on [B, N, C], reshape to heads, sdpa or explicit softmax."""

    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, fused: bool) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, fused)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-B/16 layout (DeiT-Tiny is the same net smaller); `distilled` adds DeiT's distillation token."""

    def __init__(
        self, image: int = 16, patch: int = 4, dim: int = 24, depth: int = 2, heads: int = 3,
        classes: int = 5, fused: bool = True, distilled: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.distilled = distilled
        tokens = (image // patch) ** 2 + 1 + int(distilled)
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if distilled else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, fused) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distilled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        extra = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            extra.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat([*extra, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        if self.head_dist is None:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2  # DeiT's eval-mode average


# ---------------------------------------------------------------- Swin


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def window_reverse_int_batch(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """timm < 0.9: the batch recomputed with int(), which fixes it at export time."""
    b = int(windows.shape[0] / (h * w / ws / ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[:, :, 0] * (2 * ws - 1) + rel[:, :, 1]


def shift_mask(size: int, ws: int, shift: int) -> torch.Tensor:
    img = torch.zeros(1, size, size, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    windows = window_partition(img, ws).view(-1, ws * ws)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int) -> None:
        super().__init__()
        self.heads, self.ws = heads, ws
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=False)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n = x.shape[:2]
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(-1, nw, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.heads, n, n)
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, -1))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, size: int, ws: int, shift: int, int_batch: bool = False) -> None:
        super().__init__()
        self.reverse = window_reverse_int_batch if int_batch else window_reverse
        if size <= ws:  # timm: a window as large as the map, no shift
            ws, shift = size, 0
        self.ws, self.shift = ws, shift
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, ws)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, dim * 2)
        self.register_buffer("attn_mask", shift_mask(size, ws, shift) if shift else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w, c = x.shape[1:]
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(y, self.ws).view(-1, self.ws * self.ws, c)
        windows = self.attn(windows, self.attn_mask).view(-1, self.ws, self.ws, c)
        y = self.reverse(windows, self.ws, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Swin v1 merging: four strided slices, cat on channels, LayerNorm, Linear(4C -> 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :]
        x2, x3 = x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
        return self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))


class Swin(nn.Module):
    """Swin-T layout: NHWC stages of (window, shifted window) blocks, patch merging between stages."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 16, heads: int = 2, ws: int = 4,
                 classes: int = 5, int_batch: bool = False) -> None:  # fmt: skip
        super().__init__()
        size = image // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.embed_norm = nn.LayerNorm(dim)
        blocks = [SwinBlock(dim, heads, size, ws, 0, int_batch), SwinBlock(dim, heads, size, ws, ws // 2)]
        self.stage1 = nn.Sequential(*blocks)
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(SwinBlock(2 * dim, 2 * heads, size // 2, ws, 0))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean(dim=(1, 2)))


# ---------------------------------------------------------------- PoolFormer


class PoolFormerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.layer_scale1 = nn.Parameter(torch.full((dim,), 0.5) + torch.randn(dim) * 0.1)
        self.norm2 = nn.GroupNorm(1, dim)
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, dim * 2, 1), nn.GELU(), nn.Conv2d(dim * 2, dim, 1)
        self.layer_scale2 = nn.Parameter(torch.full((dim,), 0.5) + torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.layer_scale1.unsqueeze(-1).unsqueeze(-1) * (self.pool(y) - y)
        y = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + self.layer_scale2.unsqueeze(-1).unsqueeze(-1) * y


class PoolFormer(nn.Module):
    """PoolFormer-S12 layout: conv stem, pooling blocks, strided conv downsampling, GroupNorm(1, C) head."""

    def __init__(self, dims: tuple[int, int] = (8, 16), classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 7, stride=4, padding=2)
        self.stage1 = nn.Sequential(PoolFormerBlock(dims[0]), PoolFormerBlock(dims[0]))
        self.down = nn.Conv2d(dims[0], dims[1], 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(PoolFormerBlock(dims[1]))
        self.norm = nn.GroupNorm(1, dims[1])
        self.head = nn.Linear(dims[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x).mean(dim=(2, 3)))


def _randomized_norms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial affine norm parameters, so a pass that drops or mixes them shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm | nn.GroupNorm):
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


LAYOUTS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "vit": (lambda: ViT(fused=True), (3, 16, 16)),
    "deit": (lambda: ViT(fused=False, distilled=True), (3, 16, 16)),
    "swin": (Swin, (3, 32, 32)),
    "poolformer": (PoolFormer, (3, 32, 32)),
}
LEGACY: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "swin_int_batch": (lambda: Swin(int_batch=True), (3, 32, 32)),  # timm < 0.9 window_reverse
}


def build(name: str, seed: int = 0, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The named replica (seeded random init, eval mode) and an example input batch."""
    factory, shape = {**LAYOUTS, **LEGACY}[name]
    torch.manual_seed(seed)
    model = _randomized_norms(factory(), seed)
    return model, (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed + 1)),)
