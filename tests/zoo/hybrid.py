"""Hybrid conv/attention nets with the patterns held-out timm models (BiT, BEiT, MaxViT, CoAtNet) use:

- BiT/NFNet weight standardisation: the conv weight is computed in forward (``F.batch_norm`` on it),
  so a conv reads a weight that is not a parameter;
- BEiT's qkv bias ``cat(q_bias, zeros_like(v_bias), v_bias)`` passed to ``F.linear``;
- MaxViT's window partition with ``swapaxes`` (schema names ``axis0``/``axis1``);
- CoAtNet's MBConv stage, then sdpa whose mask is a per-head relative-position bias (made by an
  MLP), and a layer scale broadcast with ``expand`` to a literal channel count (a size the rewrite
  must change).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo._base import ZooCase, image_case, register, seeded


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardised convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class BiTNet(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 12, 3, padding=1)
        self.norm = nn.GroupNorm(4, 12)
        self.conv = StdConv2d(12, 16, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.stem(x)))
        x = x + self.proj(torch.relu(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


class BeitAttention(nn.Module):
    """BEiT attention: qkv bias built in forward; tokens mixed in 2x2 windows found with swapaxes."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.swapaxes(-2, -1)) * (c // self.heads) ** -0.5
        return self.proj((attn.softmax(dim=-1) @ v).swapaxes(1, 2).reshape(b, n, c))


class BeitMaxvitNet(nn.Module):
    def __init__(self, dim: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 2, stride=2)
        self.attn = BeitAttention(dim, 2)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)  # B, C, 4, 4
        b, c, h, w = x.shape
        grid = x.reshape(b, c, 2, h // 2, 2, w // 2).swapaxes(3, 4)  # MaxViT-style window partition
        tokens = grid.reshape(b, c, h * w).swapaxes(1, 2)
        tokens = tokens + self.attn(tokens)
        tokens = tokens + self.mlp(tokens)
        return self.fc(tokens.mean(dim=1))


class MBConv(nn.Module):
    def __init__(self, dim: int, expand: int = 2) -> None:
        super().__init__()
        mid = dim * expand
        self.pw = nn.Sequential(nn.Conv2d(dim, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.GELU())
        self.dw = nn.Sequential(
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        )
        self.se = nn.Sequential(nn.Conv2d(mid, 4, 1), nn.ReLU(), nn.Conv2d(4, mid, 1), nn.Sigmoid())
        self.project = nn.Conv2d(mid, dim, 1)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.dw(self.pw(x)))
        y = self.project(y * self.se(y.mean(dim=(2, 3), keepdim=True)))
        scale = self.gamma.view(1, -1, 1, 1).expand(1, self.gamma.shape[0], y.shape[2], y.shape[3])
        return x + y * scale


class RelPosAttention(nn.Module):
    """Attention over the tokens of a 2-D map with a relative-position bias made by a small MLP."""

    def __init__(self, dim: int, heads: int, size: int) -> None:
        super().__init__()
        self.heads, self.size = heads, size
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        coords = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).reshape(-1, 2).float()
        self.register_buffer("rel_coords", torch.sign(rel) * torch.log1p(rel.abs()))
        self.bias_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).view(b, self.heads, 3 * c // self.heads, n).chunk(3, dim=2)
        bias = self.bias_mlp(self.rel_coords).view(n, n, self.heads).permute(2, 0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(  # the bias is a mask with one slice per head
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), attn_mask=bias
        )
        return self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class CoAtNetLike(nn.Module):
    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.GELU())
        self.mbconv = MBConv(12)
        self.down = nn.Conv2d(12, 16, 2, stride=2)
        self.attn = RelPosAttention(16, 2, 2)
        self.mlp = nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.mbconv(self.stem(x)))
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.fc(x.mean(dim=(2, 3)))


@register("bit_stdconv")
def bit_stdconv() -> ZooCase:
    return image_case("bit_stdconv", seeded(BiTNet, 32), (3, 8, 8), "hybrid")


@register("beit_maxvit_attention")
def beit_maxvit_attention() -> ZooCase:
    return image_case("beit_maxvit_attention", seeded(BeitMaxvitNet, 33), (3, 8, 8), "hybrid")


@register("coatnet_like")
def coatnet_like() -> ZooCase:
    return image_case("coatnet_like", seeded(CoAtNetLike, 34), (3, 8, 8), "hybrid")
