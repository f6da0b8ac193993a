"""Helpers the op families share: the pin-everything fallback, dim arithmetic, facts and sizes."""

from __future__ import annotations

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import Facts
from slimship.slimming.graph import ChannelGraph, pin_touched, shape_of


def pin_unknown(g: ChannelGraph, node: Node, reason: str) -> None:
    """The fallback: every dim of every tensor argument and of the result stays."""
    pin_touched(g, node, reason)
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        g.layouts[node] = [
            [g.fresh(s, reason) for s in concrete_sizes(v)] if isinstance(v, torch.Tensor) else None
            for v in val
        ]
    else:
        g.layouts[node] = g.fresh_layout(node, pin=reason)


def concrete_sizes(val: torch.Tensor) -> list[int | None]:
    """A tensor's concrete sizes; None for symbolic ones."""
    return [int(s) if isinstance(s, int) else None for s in val.shape]


def dim_index(d: int, rank: int) -> int:
    """A possibly negative dim as an index into `rank` dims."""
    return d + rank if d < 0 else d


def fresh_layout_of(g: ChannelGraph, val: torch.Tensor, reason: str) -> list[np.ndarray | None]:
    """New pinned positions for every dim of a tensor."""
    return [g.fresh(s, reason) for s in concrete_sizes(val)]


def rank_of(node: Node) -> int:
    return len(shape_of(node))


def no_facts(node: Node) -> Facts:
    """One unknown entry per dim of the node's value."""
    return [None] * rank_of(node)


def new_size(g: ChannelGraph, keep: np.ndarray, node: Node, d: int) -> int | None:
    """The size dim d of a node's value has once the components not in `keep` are gone."""
    layout = g.layouts.get(node)
    if layout is None or d >= len(layout) or layout[d] is None:
        return None
    return int(keep[g.component[layout[d]]].sum())
