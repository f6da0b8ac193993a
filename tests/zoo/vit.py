"""Small ViTs: patch-embedding conv, class token, position embedding, explicit q/k/v attention.

One case uses ``F.scaled_dot_product_attention``, the other an explicit softmax(q @ k^T) @ v.
"""

from __future__ import annotations

from slimship.models import VisionTransformer
from tests.zoo._base import ZooCase, image_case, register, seeded


def _vit(kernel: str) -> VisionTransformer:
    return VisionTransformer(
        image_size=16,
        in_channels=3,
        num_classes=5,
        dim=32,
        depth=2,
        heads=4,
        mlp_ratio=2,
        patch=4,
        kernel=kernel,
    )


@register("vit_sdpa")
def vit_sdpa() -> ZooCase:
    return image_case("vit_sdpa", seeded(lambda: _vit("sdpa"), 11), (3, 16, 16), "vit")


@register("vit_explicit")
def vit_explicit() -> ZooCase:
    return image_case("vit_explicit", seeded(lambda: _vit("explicit"), 12), (3, 16, 16), "vit")
