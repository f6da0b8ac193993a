"""Coupling: apply each op's coupling rule (`slimship.slimming.ops`) to build the channel graph.

A rule receives the channel graph, the node and its arguments by schema name; it sets the node's
layout, unifies the positions that must be removed together and registers the sites that mix values.
An op with no record pins every dimension it touches (`pin_unknown`): unknown means unprunable.
In-place and `.out` calls use their functional op's rule; the tensor they write into shares the result's
positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from slimship.slimming.graph import (
    ChannelGraph,
    Site,
    flat_values,
    get_tensor,
    is_tensor_node,
    node_inputs,
    op_args,
    op_name,
    shape_of,
)
from slimship.slimming.ops import pin_unknown, record_for, written_args

__all__ = ["build_channel_graph", "pin_unknown", "tensor_key"]


def build_channel_graph(gm: torch.fx.GraphModule, unreadable: dict[str, str] | None = None) -> ChannelGraph:
    """Apply the rule table to every node of `gm` and solve the components.

    A rule that cannot read its node (any exception) pins what the node touches, as for an op without
    a rule, and is recorded in `g.unreadable`. Nodes named in `unreadable` (name -> reason, found by a
    later stage) are pinned without trying their rule.
    """
    g = ChannelGraph(gm)
    by_tensor: dict[Any, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":  # one layout per tensor, however many nodes (or tied names) read it
            key = tensor_key(gm, node)
            if key not in by_tensor:
                by_tensor[key] = g.fresh_layout(node)
            g.layouts[node] = by_tensor[key]
        elif node.op == "placeholder":
            g.layouts[node] = g.fresh_layout(node, pin="model input")
        elif node.op == "call_function":
            _apply_rule(g, node, (unreadable or {}).get(node.name))
        elif node.op == "output":
            for value in flat_values(node.args):
                g.pin_layout(g.layout(value), "model output")
        elif node.op == "call_module":  # export guards; they take inputs that are pinned already
            pass
    g.solve()
    return g


def tensor_key(gm: torch.fx.GraphModule, node: Node) -> Any:
    """The identity of the tensor a get_attr reads, so that tied names (GPT-2's lm_head and wte) share
    one layout; the target itself when it is not a tensor."""
    try:
        tensor = get_tensor(gm, str(node.target))
    except AttributeError:
        return node.target
    return id(tensor) if isinstance(tensor, torch.Tensor) else node.target


def _apply_rule(g: ChannelGraph, node: Node, known_unreadable: str | None) -> None:
    name = op_name(node)
    record = record_for(name)
    if known_unreadable is not None:
        return pin_unknown(g, node, known_unreadable)
    if record is None:
        if any(is_tensor_node(a) for a in node_inputs(node)) or is_tensor_node(node):
            g.unsupported.setdefault(name, []).append(node.name)
        return pin_unknown(g, node, f"no rule for {name} (node {node.name})")
    edges, sites = len(g._edges), len(g.sites)
    try:
        args = op_args(node)
        record.coupling(g, node, args)
        _check_layout(node, g.layouts.get(node))
        _tie_written(g, node, args)
        for site in g.sites[sites:]:
            _check_site(g, site)
    except Exception as exc:  # unknown means unprunable: whatever the rule could not read stays
        del g._edges[edges:], g.sites[sites:]
        pin_unknown(g, node, g.record_unreadable(node, "coupling", exc))


def _check_layout(node: Node, layout: Any) -> None:
    """A rule's layout must have one entry per dim of the node's value (catches misread arguments)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    if not isinstance(layout, list) or len(layout) != val.dim():
        raise ValueError(f"layout of rank {len(layout or [])} for a rank-{val.dim()} result")
    for ids, size in zip(layout, shape_of(node), strict=True):
        if ids is not None and size is not None and len(ids) != size:
            raise ValueError(f"layout of {len(ids)} positions for a dim of size {size}")


def _check_site(g: ChannelGraph, site: Site) -> None:
    """A site's operands must align position by position along the dims it mixes."""
    sizes = {len(g.layout(n)[d]) if g.layout(n)[d] is not None else None for n, d in site.operands}
    if len(sizes) != 1:
        raise ValueError(f"{site.kind} site of mismatched sizes {sorted(map(str, sizes))}")


def _tie_written(g: ChannelGraph, node: Node, args: dict[str, Any]) -> None:
    """An in-place or `.out` call's result is the tensor it writes into: same positions, dim by dim
    (a write that changes the shape, `unsqueeze_`, pins both)."""
    for name in written_args(node):
        target = args.get(name)
        if not is_tensor_node(target):
            continue
        before, after = g.layout(target), g.layouts.get(node)
        if before is None or after is None or shape_of(target) != shape_of(node):
            g.pin_layout(before, f"{op_name(node)} {node.name} writes into this tensor")
            g.pin_layout(after, f"{op_name(node)} {node.name} writes into this tensor")
            continue
        for ids_before, ids_after in zip(before, after, strict=True):
            g.unify(ids_before, ids_after, f"{op_name(node)} {node.name} writes into this tensor")
