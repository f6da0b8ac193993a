"""Test model zoo: small, seeded, structurally faithful architectures for the slimming tests.

``ZOO`` maps a case name to a builder returning a fresh :class:`ZooCase`; ``build(name)`` calls it.
Each architecture family lives in its own module; importing this package registers them all.
"""

from __future__ import annotations

from tests.zoo._base import BATCH, ZOO, ZooCase, randomize_norms, register

# Import the family modules for their registrations (order fixes the order of ZOO).
from tests.zoo import (  # noqa: F401  # isort: skip
    chain,
    vgg,
    resnet,
    mobilenet,
    densenet,
    convnext,
    vit,
    bert,
    unet,
    norms,
    shared,
    sequence,
    mlp,
    inception,
    gpt2,
    llama,
    hybrid,
    darknet,
    reparam,
)


def build(name: str) -> ZooCase:
    """Build the zoo case ``name`` (KeyError lists the known names)."""
    try:
        builder = ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo case {name!r}; known: {sorted(ZOO)}") from None
    return builder()


__all__ = ["BATCH", "ZOO", "ZooCase", "build", "randomize_norms", "register"]
