"""Shape and view ops: dims are permuted, inserted, dropped or regrouped; views hold their sizes."""

from __future__ import annotations

from typing import Any

import numpy as np
import sympy
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    ChannelGraph,
    set_op_arg,
    shape_of,
)
from slimship.slimming.ops.common import (
    dim_index,
    new_size,
)
from slimship.slimming.ops.record import register_op


def permute(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = g.layout(a["self"])
    g.layouts[node] = [xl[dim_index(int(d), len(xl))] for d in a["dims"]]


def permute_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    n = len(shape_of(a["self"]))
    return [va.dim(a["self"], int(d) % n) for d in a["dims"]]


register_op("aten.permute", permute, permute_values)


def transpose(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d0, d1 = dim_index(int(a["dim0"]), len(xl)), dim_index(int(a["dim1"]), len(xl))
    xl[d0], xl[d1] = xl[d1], xl[d0]
    g.layouts[node] = xl


def transpose_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    n = len(shape_of(x))
    facts = [va.dim(x, d) for d in range(n)]
    d0, d1 = int(a["dim0"]) % n, int(a["dim1"]) % n
    facts[d0], facts[d1] = facts[d1], facts[d0]
    return facts


register_op(("aten.transpose", "aten.swapaxes"), transpose, transpose_values)


def t(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    g.layouts[node] = list(reversed(g.layout(a["self"])))


def t_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    return [va.dim(x, d) for d in reversed(range(len(shape_of(x))))]


register_op(("aten.t", "aten.numpy_T"), t, t_values)


def unsqueeze(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d = dim_index(int(a["dim"]), len(xl) + 1)
    g.layouts[node] = xl[:d] + [g.fresh(1, "unit dim")] + xl[d:]


def unsqueeze_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    facts: Facts = [va.dim(x, d) for d in range(len(shape_of(x)))]
    d = int(a["dim"]) % (len(facts) + 1)
    return facts[:d] + [None] + facts[d:]


register_op("aten.unsqueeze", unsqueeze, unsqueeze_values)


def squeeze(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl, shape = g.layout(x), shape_of(x)
    dims = a.get("dim")
    if dims is None:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        drop = {dim_index(int(d), len(xl)) for d in dims if shape[dim_index(int(d), len(xl))] == 1}
    g.layouts[node] = [ids for i, ids in enumerate(xl) if i not in drop]


def squeeze_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    shape = shape_of(x)
    dims = a.get("dim")
    if dims is None:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        drop = {int(d) % len(shape) for d in dims if shape[int(d) % len(shape)] == 1}
    return [va.dim(x, d) for d in range(len(shape)) if d not in drop]


register_op("aten.squeeze", squeeze, squeeze_values)


def expand(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl, in_shape, out_shape = g.layout(x), shape_of(x), shape_of(node)
    lead = len(out_shape) - len(xl)
    out = [g.fresh(s, "expanded dim") for s in out_shape[:lead]]
    for d, ids in enumerate(xl):
        if in_shape[d] == 1 and out_shape[lead + d] != 1:
            g.pin(ids, f"expand {node.name} broadcasts this dim")
            out.append(g.fresh(out_shape[lead + d], "expanded dim"))
        else:
            out.append(ids)
    g.layouts[node] = out


def expand_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    in_shape, out_shape = shape_of(x), shape_of(node)
    lead = len(out_shape) - len(in_shape)
    facts: Facts = [None] * lead
    for d in range(len(in_shape)):
        keep = not (in_shape[d] == 1 and out_shape[lead + d] != 1)
        facts.append(va.dim(x, d) if keep else None)
    return facts


def reshape(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Split shapes into blocks of equal products; in a block only the outermost dims carry channels."""
    x = a.get("self", a.get("input"))
    xl = g.layout(x)
    in_sizes = sym_sizes(x)
    out_sizes = sym_sizes(node)
    blocks = reshape_blocks(in_sizes, out_sizes)
    out: list[np.ndarray | None] = [None] * len(out_sizes)
    if blocks is None:
        g.pin_layout(xl, f"reshape {node.name} that is not a split/merge of dims")
        g.layouts[node] = g.fresh_layout(node, pin=f"reshape {node.name}")
        return
    for ins, outs in blocks:
        in_dims = [i for i in ins if in_sizes[i] != 1]
        out_dims = [o for o in outs if out_sizes[o] != 1]
        for o in outs:
            if out_sizes[o] == 1:
                out[o] = g.fresh(1, "unit dim")
        if not in_dims or not out_dims:
            for o in out_dims:
                out[o] = g.fresh(as_int(out_sizes[o]), "reshape")
            continue
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = xl[in_dims[0]]
            continue
        reason = f"inner dim of reshape {node.name}"
        for i in in_dims[1:]:
            g.pin(xl[i], reason)
        for o in out_dims[1:]:
            out[o] = g.fresh(as_int(out_sizes[o]), reason)
        outer_in, outer_out = xl[in_dims[0]], None
        sizes = [as_int(in_sizes[i]) for i in in_dims] + [as_int(out_sizes[o]) for o in out_dims]
        if outer_in is None or any(s is None for s in sizes):
            why = f"reshape {node.name} of a dynamic dim"
            g.pin(outer_in, why)
            out[out_dims[0]] = g.fresh(as_int(out_sizes[out_dims[0]]), why)
            continue
        total = int(np.prod([as_int(in_sizes[i]) for i in in_dims]))
        inner_in = total // as_int(in_sizes[in_dims[0]])
        inner_out = total // as_int(out_sizes[out_dims[0]])
        outer_out = g.fresh(as_int(out_sizes[out_dims[0]]))
        flat = np.arange(total)
        g.unify(outer_in[flat // inner_in], outer_out[flat // inner_out], f"reshape {node.name}")
        out[out_dims[0]] = outer_out
    g.layouts[node] = out


def reshape_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """Map slices through the outermost dims of each block (see rules.reshape)."""
    x = a.get("self", a.get("input"))
    in_sizes, out_sizes = sym_sizes(x), sym_sizes(node)
    blocks = reshape_blocks(in_sizes, out_sizes)
    out: Facts = [None] * len(out_sizes)
    if blocks is None:
        return out
    for ins, outs in blocks:
        in_dims = [i for i in ins if in_sizes[i] != 1]
        out_dims = [o for o in outs if out_sizes[o] != 1]
        if not in_dims or not out_dims:
            continue
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = va.dim(x, in_dims[0])
            continue
        o = out_dims[0]
        facts = va.dim(x, in_dims[0])
        sizes = [as_int(in_sizes[i]) for i in in_dims] + [as_int(out_sizes[j]) for j in out_dims]
        if facts is None or not va.live(node, o) or any(s is None for s in sizes):
            continue
        total = int(np.prod([as_int(in_sizes[i]) for i in in_dims]))
        inner_in = total // as_int(in_sizes[in_dims[0]])
        inner_out = total // as_int(out_sizes[o])
        flat = np.arange(total)
        src = flat // inner_in
        consts = facts.const[src].reshape(-1, inner_out)
        const = np.where((consts == consts[:, :1]).all(axis=1), consts[:, 0], np.nan)
        keys = np.stack([facts.cls[src], flat % inner_in], axis=1).reshape(-1, inner_out * 2)
        out[o] = DimFacts(const, relabel(keys, const))
    return out


def shape_list(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    key = "size" if "size" in a else "shape"
    sizes = list(a[key])
    offset = len(shape_of(node)) - len(sizes)
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            size = new_size(g, keep, node, i + offset)
            if size is not None:
                sizes[i] = size
    set_op_arg(node, key, sizes)


def unflatten_sizes(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    d = int(a["dim"]) % len(shape_of(a["self"]))
    sizes = list(a["sizes"])
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            size = new_size(g, keep, node, d + i)
            if size is not None:
                sizes[i] = size
    set_op_arg(node, "sizes", sizes)


register_op(("aten.view", "aten.reshape", "aten._unsafe_view"), reshape, reshape_values, shape_list)
register_op("aten.expand", expand, expand_values, shape_list)
register_op("aten.expand_as", expand, expand_values)
register_op("aten.unflatten", reshape, reshape_values, unflatten_sizes)
register_op(("aten.flatten", "aten.view_as", "aten.reshape_as"), reshape, reshape_values)


def as_int(s: Any) -> int | None:
    return int(s) if isinstance(s, int | sympy.Integer) else None


def sym_sizes(node: Node) -> list[Any]:
    val = node.meta["val"]
    return [s if isinstance(s, int) else s.node.expr for s in val.shape]


def reshape_blocks(ins: list[Any], outs: list[Any]) -> list[tuple[list[int], list[int]]] | None:
    """Group dims into (input dims, output dims) blocks with equal products, or None."""
    blocks = []
    i = j = 0
    while i < len(ins) or j < len(outs):
        bi, bj = [], []
        pi, pj = sympy.Integer(1), sympy.Integer(1)
        if i < len(ins):
            bi.append(i)
            pi *= ins[i]
            i += 1
        if j < len(outs):
            bj.append(j)
            pj *= outs[j]
            j += 1
        guard = 0
        while sympy.simplify(pi - pj) != 0:
            guard += 1
            if guard > 64:
                return None
            grow_in = _grow_input(pi, pj)
            if grow_in and i < len(ins):
                bi.append(i)
                pi *= ins[i]
                i += 1
            elif j < len(outs):
                bj.append(j)
                pj *= outs[j]
                j += 1
            elif i < len(ins):
                bi.append(i)
                pi *= ins[i]
                i += 1
            else:
                return None
        # trailing unit dims join the current block
        while i < len(ins) and ins[i] == 1 and (j >= len(outs) or outs[j] != 1):
            bi.append(i)
            i += 1
        while j < len(outs) and outs[j] == 1 and (i >= len(ins) or ins[i] != 1):
            bj.append(j)
            j += 1
        blocks.append((bi, bj))
    return blocks


def _grow_input(pi: Any, pj: Any) -> bool:
    """True if the input block's product is the smaller one and should take the next dim."""
    ratio = sympy.simplify(pj / pi)
    if ratio.is_number:
        return bool(ratio > 1)
    return not bool(sympy.simplify(1 / ratio).is_integer)
