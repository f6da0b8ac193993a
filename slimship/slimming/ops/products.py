"""Products: linear layers, addmm (a linear layer stored [in, out]), matmul, embedding lookups."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    DOT,
    LINEAR,
    ChannelGraph,
    Site,
    is_tensor_node,
    op_name,
    shape_of,
)
from slimship.slimming.ops.common import (
    no_facts,
    pin_unknown,
    rank_of,
)
from slimship.slimming.ops.mixing import computed_weight_out, mixing_out
from slimship.slimming.ops.record import register_op


def linear(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x, w, b = a["input"], a["weight"], a.get("bias")
    xl, wl = g.layout(x), g.layout(w)
    out = [*xl[:-1], wl[0]]
    if b is not None:
        g.unify(wl[0], g.layout(b)[0], "linear bias")
    g.unify(xl[-1], wl[1], "linear input features")
    g.consumer_dims.add((w, 1))
    g.sites.append(
        Site(node, LINEAR, [(x, len(xl) - 1), (w, 1)], weight=w, weight_dim=1, bias=b, foldable=True)
    )
    g.layouts[node] = out


def linear_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x, w, b = a["input"], a["weight"], a.get("bias")
    rank = rank_of(node)
    result = no_facts(node)
    out_ch = shape_of(node)[-1]
    bias = va.vector(b, out_ch) if b is not None else None
    for d in range(rank - 1):  # slices along leading dims: zero stays zero without a bias
        if va.live(node, d):
            facts = va.dim_or_unknown(x, d, shape_of(node)[d])
            zero_bias = bias is None or bool((bias == 0).all())
            const = np.where((facts.const == 0) & zero_bias, 0.0, np.nan)
            result[d] = DimFacts(const, relabel(facts.cls, const))
    if va.live(node, rank - 1):
        if va.has_param(w):
            facts = va.dim(x, len(shape_of(x)) - 1)
            result[rank - 1] = mixing_out(va, va.param(w).detach(), bias, facts, exact_const=True)
        else:
            result[rank - 1] = computed_weight_out(va, w, bias, out_ch)
    return result


register_op("aten.linear", coupling=linear, values=linear_values)


def addmm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """beta * bias + alpha * (x @ W): a linear layer whose weight is stored [in, out] (GPT-2's Conv1D)
    or given as W.t()."""
    x, mat2, bias = a["mat1"], a["mat2"], a["self"]
    xl, ml = g.layout(x), g.layout(mat2)
    out = [xl[0], ml[1]]
    g.unify(xl[1], ml[0], "addmm inner dim")
    for bd, ids in enumerate(reversed(g.layout(bias) or [])):
        d = 1 - bd
        if shape_of(bias)[-1 - bd] != 1 or shape_of(node)[d] == 1:
            g.unify(out[d], ids, "addmm bias")
    weight, weight_dim = addmm_weight(mat2)
    plain = a.get("alpha", 1) == 1 and a.get("beta", 1) == 1
    one_d_bias = bias if is_tensor_node(bias) and len(shape_of(bias)) == 1 else None
    if weight is not None:
        g.consumer_dims.add((weight, weight_dim))
    site = Site(
        node,
        LINEAR,
        [(x, 1), (mat2, 0)],
        weight=weight if weight is not None else mat2,
        weight_dim=weight_dim,
        bias=one_d_bias,
    )
    site.foldable = plain and weight is not None and one_d_bias is not None
    g.sites.append(site)
    g.layouts[node] = out


def addmm_weight(mat2: Any) -> tuple[Node | None, int]:
    """The parameter behind addmm's mat2 and its input-side dim: 0 for a stored [in, out] weight,
    1 for a [out, in] weight read through `t()`; (None, 0) for a computed one."""
    if isinstance(mat2, Node) and mat2.op == "get_attr":
        return mat2, 0
    if isinstance(mat2, Node) and op_name(mat2) in ("aten.t", "aten.numpy_T"):
        source = mat2.args[0]
        if isinstance(source, Node) and source.op == "get_attr" and len(shape_of(source)) == 2:
            return source, 1
    return None, 0


def addmm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """Facts of beta * bias + alpha * (x @ W) for alpha = beta = 1 (a linear layer), else none."""

    x, mat2, b = a["mat1"], a["mat2"], a["self"]
    result = no_facts(node)
    if a.get("alpha", 1) != 1 or a.get("beta", 1) != 1 or not is_tensor_node(b) or len(shape_of(b)) != 1:
        return result
    n, out_ch = shape_of(node)
    bias = va.vector(b, out_ch) if shape_of(b)[0] == out_ch else np.full(out_ch, np.nan)
    if va.live(node, 0):
        facts = va.dim_or_unknown(x, 0, n)
        const = np.where((facts.const == 0) & bool((bias == 0).all()), 0.0, np.nan)
        result[0] = DimFacts(const, relabel(facts.cls, const))
    if va.live(node, 1):
        weight, weight_dim = addmm_weight(mat2)
        if weight is None:
            result[1] = computed_weight_out(va, mat2, bias, out_ch, weight_dim=1)
        else:
            w = va.param(weight).detach()
            w = w.t() if weight_dim == 0 else w
            result[1] = mixing_out(va, w, bias, va.dim(x, 1), exact_const=True)
    return result


register_op("aten.addmm", coupling=addmm, values=addmm_values)


def matmul(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x, y = a["self"], a["mat2" if "mat2" in a else "other"]
    xl, yl = g.layout(x), g.layout(y)
    if len(xl) < 2 or len(yl) < 2:
        return pin_unknown(g, node, f"{op_name(node)} {node.name} on vectors")
    g.unify(xl[-1], yl[-2], "matmul inner dim")
    g.sites.append(Site(node, DOT, [(x, len(xl) - 1), (y, len(yl) - 2)]))
    out_shape = shape_of(node)
    batch = _broadcast_batch(g, node, [(x, xl[:-2]), (y, yl[:-2])], len(out_shape) - 2)
    g.layouts[node] = batch + [xl[-2], yl[-1]]


def _broadcast_batch(g: ChannelGraph, node: Node, parts, rank: int) -> list[np.ndarray | None]:
    out_shape = shape_of(node)
    out: list[np.ndarray | None] = [None] * rank
    for t, layout in parts:
        t_shape = shape_of(t)[: len(layout)]
        for td, ids in enumerate(layout):
            d = td + rank - len(layout)
            if t_shape[td] == 1 and out_shape[d] != 1:
                continue
            if out[d] is None:
                out[d] = ids
            else:
                g.unify(out[d], ids, "batched matmul")
    return [o if o is not None else g.fresh(out_shape[d], "broadcast") for d, o in enumerate(out)]


def matmul_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x, y = a["self"], a["mat2" if "mat2" in a else "other"]
    rank = rank_of(node)
    xr, yr = len(shape_of(x)), len(shape_of(y))
    out = no_facts(node)
    xf, yf = va.dim(x, xr - 2), va.dim(y, yr - 1)
    if xf is not None:
        out[rank - 2] = DimFacts(np.where(xf.const == 0, 0.0, np.nan), xf.cls)
    if yf is not None:
        out[rank - 1] = DimFacts(np.where(yf.const == 0, 0.0, np.nan), yf.cls)
    for d in range(rank - 2):
        if va.live(node, d):
            parts = [va.dim(t, d - (rank - r)) for t, r in ((x, xr), (y, yr)) if d - (rank - r) >= 0]
            parts = [p for p in parts if p is not None and len(p.const) == shape_of(node)[d]]
            if parts:
                zero = np.any([p.const == 0 for p in parts], axis=0)
                const = np.where(zero, 0.0, np.nan)
                out[d] = DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const))
    return out


register_op(("aten.matmul", "aten.bmm", "aten.mm"), coupling=matmul, values=matmul_values)


def embedding(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    w, idx = a["weight"], a["indices"]
    wl = g.layout(w)
    g.pin(wl[0], "embedding vocabulary")
    g.layouts[node] = [*g.layout(idx), wl[1]]


def embedding_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    out = no_facts(node)
    if va.live(node, len(out) - 1):
        out[-1] = va.param_facts(a["weight"], 1)
    return out


register_op(
    "aten.embedding",
    embedding,
    embedding_values,
    fixed_sizes="padding_idx indexes the vocabulary, which stays",
)
