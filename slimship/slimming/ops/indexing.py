"""Concatenation, splitting and indexing: segments of a dim keep their positions."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    ChannelGraph,
    is_multi,
    is_tensor_node,
    op_name,
    set_op_arg,
    shape_of,
)
from slimship.slimming.ops.common import (
    dim_index,
    pin_unknown,
    rank_of,
)
from slimship.slimming.ops.record import register_op


def cat(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    tensors = [t for t in a["tensors"] if is_tensor_node(t) and shape_of(t) != [0]]
    rank = len(shape_of(node))
    d = dim_index(int(a.get("dim") or 0), rank)
    layouts = [g.layout(t) for t in tensors]
    out: list[np.ndarray | None] = []
    for i in range(rank):
        if i == d:
            parts = [lay[i] for lay in layouts]
            if any(p is None for p in parts):
                g.pin_layout(parts, "cat of a dynamic dim")
                out.append(g.fresh(shape_of(node)[i], "cat of a dynamic dim"))
            else:
                out.append(np.concatenate(parts))
        else:
            for lay in layouts[1:]:
                g.unify(layouts[0][i], lay[i], "cat operands")
            out.append(layouts[0][i])
    g.layouts[node] = out


def cat_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    tensors = [t for t in a["tensors"] if is_tensor_node(t) and shape_of(t) != [0]]
    rank = rank_of(node)
    d = int(a.get("dim") or 0) % rank
    out: Facts = []
    for i in range(rank):
        if not va.live(node, i):
            out.append(None)
        elif i == d:
            parts = [va.dim_or_unknown(t, i, shape_of(t)[i]) for t in tensors]
            out.append(
                DimFacts(np.concatenate([p.const for p in parts]), np.concatenate([p.cls for p in parts]))
            )
        else:
            n = shape_of(node)[i]
            parts = [va.dim_or_unknown(t, i, n) for t in tensors]
            consts = np.stack([p.const for p in parts])
            const = np.where((consts == consts[0]).all(axis=0), consts[0], np.nan)
            out.append(DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const)))
    return out


register_op(("aten.cat", "aten.concat", "aten.concatenate"), cat, cat_values)


def split(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl = g.layout(x)
    d = dim_index(int(a.get("dim") or 0), len(xl))
    outs = []
    offset = 0
    for val in node.meta["val"]:
        size = int(val.shape[d])
        layout = list(xl)
        if xl[d] is not None:
            layout[d] = xl[d][offset : offset + size]
        outs.append(layout)
        offset += size
    if xl[d] is None and len(outs) > 1:
        return pin_unknown(g, node, "split of a dynamic dim")
    g.layouts[node] = outs


def split_values(va: FactStore, node: Node, a: dict[str, Any]) -> list[Facts]:
    x = a["self"]
    shape = shape_of(x)
    d = int(a.get("dim") or 0) % len(shape)
    facts = [va.dim(x, i) for i in range(len(shape))]
    outs, offset = [], 0
    for val in node.meta["val"]:
        size = int(val.shape[d])
        part = list(facts)
        if facts[d] is not None:
            part[d] = facts[d].take(slice(offset, offset + size))
        outs.append(part)
        offset += size
    return outs


def split_sizes(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    d = int(a.get("dim") or 0) % len(shape_of(x))
    layouts = g.layouts.get(node)
    if not layouts or layouts[0][d] is None:
        return
    sizes = [int(keep[g.component[lay[d]]].sum()) for lay in layouts]
    old = [int(v.shape[d]) for v in node.meta["val"]]
    if sizes != old:
        node.target = torch.ops.aten.split_with_sizes.default
        node.args, node.kwargs = (x, sizes, d), {}


SPLITS = ("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split", "aten.tensor_split")
register_op(SPLITS, split, split_values, split_sizes)


def unbind(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl = g.layout(x)
    d = dim_index(int(a.get("dim") or 0), len(xl))
    g.pin(xl[d], f"unbind {node.name}")
    g.layouts[node] = [list(xl[:d]) + list(xl[d + 1 :]) for _ in node.meta["val"]]


register_op("aten.unbind", unbind)


def getitem(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    source, index = node.args
    layout = g.layout(source)
    if layout is None or not is_multi(layout) or not isinstance(index, int):
        return pin_unknown(g, node, f"getitem {node.name}")
    g.layouts[node] = layout[index]


def getitem_values(va: FactStore, node: Node, a: dict[str, Any]) -> Any:
    source, index = node.args
    facts = va.facts.get(source)
    if isinstance(facts, list) and isinstance(index, int) and index < len(facts):
        item = facts[index]
        return item if isinstance(item, list) else None
    return None


register_op("getitem", getitem, getitem_values)


def slice_(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    xl = list(g.layout(x))
    d = dim_index(int(a.get("dim") or 0), len(xl))
    size = shape_of(x)[d]
    if op_name(node) == "aten.narrow":
        start, end, step = a["start"], a["start"] + a["length"] if isinstance(a["start"], int) else None, 1
    else:
        start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
    if xl[d] is None or not all(isinstance(v, int | None) for v in (start, end)) or step != 1:
        if xl[d] is not None:
            g.pin(xl[d], f"slice {node.name} with a dynamic or strided range")
        xl[d] = g.fresh(shape_of(node)[d], "sliced dim")
        g.layouts[node] = xl
        return
    lo, hi, _ = slice(start, end).indices(size)
    xl[d] = xl[d][lo:hi]
    g.layouts[node] = xl


def slice_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a.get("self", a.get("input"))
    shape = shape_of(x)
    d = int(a.get("dim") or 0) % len(shape)
    facts = [va.dim(x, i) for i in range(len(shape))]
    if facts[d] is not None:
        if op_name(node) == "aten.narrow":
            start, end, step = a["start"], a["start"] + a["length"], 1
        else:
            start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
        if all(isinstance(v, int | None) for v in (start, end)) and step == 1:
            lo, hi, _ = slice(start, end).indices(shape[d])
            facts[d] = facts[d].take(slice(lo, hi))
        else:
            facts[d] = None
    return facts


def slice_bounds(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    d = int(a.get("dim") or 0) % len(shape_of(x))
    layout = g.layouts.get(x)
    if layout is None or layout[d] is None:
        return
    keep = keep[g.component[layout[d]]]
    if keep.all():
        return
    prefix = np.concatenate([[0], np.cumsum(keep)])
    if op_name(node) == "aten.narrow":
        start, length = int(a["start"]), int(a["length"])
        set_op_arg(node, "start", int(prefix[start]))
        set_op_arg(node, "length", int(prefix[start + length] - prefix[start]))
        return
    lo, hi, _ = slice(a.get("start"), a.get("end")).indices(len(keep))
    set_op_arg(node, "start", int(prefix[lo]))
    set_op_arg(node, "end", int(prefix[hi]))


register_op(("aten.slice", "aten.narrow"), slice_, slice_values, slice_bounds)


def select(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d = dim_index(int(a["dim"]), len(xl))
    g.pin(xl[d], f"select {node.name} picks an index of this dim")
    g.layouts[node] = xl[:d] + xl[d + 1 :]


def select_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    n = len(shape_of(x))
    d = int(a["dim"]) % n
    return [va.dim(x, i) for i in range(n) if i != d]


register_op("aten.select", select, select_values, fixed_sizes="its index is into a dim that stays")
