"""Ops that make new tensors (their dims stay) or read no tensor values."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from slimship.slimming.graph import (
    ChannelGraph,
)
from slimship.slimming.ops.record import register_op


def no_layout(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    g.layouts[node] = None


register_op(("aten.sym_size", "aten.sym_numel", "aten.sym_stride"), no_layout)


def assert_metadata(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """An assertion on a tensor's dtype and device reads nothing slimming changes; one on its sizes or
    strides pins the tensor."""
    if a.get("size") is not None or a.get("stride") is not None:
        g.pin_layout(g.layout(a["a"]), f"{node.name} asserts these sizes")
    g.layouts[node] = None


register_op(
    "aten._assert_tensor_metadata", assert_metadata, fixed_sizes="a tensor whose sizes it asserts stays"
)


def factory(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """A new tensor (`new_*` read only their operand's dtype and device): its dims stay."""
    g.layouts[node] = g.fresh_layout(node, pin=f"constant tensor {node.name}")


FACTORIES = (
    "aten.arange",
    "aten.zeros",
    "aten.ones",
    "aten.full",
    "aten.empty",
    "aten.scalar_tensor",
    "aten.tensor",
    "aten.new_zeros",
    "aten.new_ones",
    "aten.new_full",
    "aten.new_empty",
)
register_op(FACTORIES, factory, fixed_sizes="a new tensor's dims stay")
