"""Reductions and ops along one dim: a reduced dim goes (a sum is a site), the others pass through."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, facts_of
from slimship.slimming.graph import (
    SUM,
    ChannelGraph,
    Site,
    op_name,
    shape_of,
)
from slimship.slimming.ops.common import (
    dim_index,
    pin_unknown,
)
from slimship.slimming.ops.record import register_op


def reduction(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Kept dims pass through; a reduced dim stays, except under a sum (a site: zeros removable)."""
    out = None if isinstance(node.meta.get("val"), list | tuple) else _reduced_layout(g, node, a)
    if out is None:
        return pin_unknown(g, node, f"{op_name(node)} {node.name} reduces the whole tensor")
    g.layouts[node] = out


def _reduced_layout(
    g: ChannelGraph, node: Node, a: dict[str, Any], sums: bool = False
) -> list[np.ndarray | None] | None:
    """The kept dims' positions; a reduced dim is a sum site (`sums`, or a plain sum) or stays."""
    x = a.get("self", a.get("input"))
    xl = g.layout(x)
    dims = a.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    name = op_name(node)
    if dims is None or len(dims) == 0:
        return None
    rank = len(xl)
    reduced = {dim_index(int(d), rank) for d in dims}
    keep = bool(a.get("keepdim"))
    out: list[np.ndarray | None] = []
    for d in range(rank):
        if d in reduced:
            if (sums or name == "aten.sum") and xl[d] is not None and len(xl[d]) > 1:
                g.sites.append(Site(node, SUM, [(x, d)]))
            else:
                g.pin(xl[d], f"{name} {node.name} reduces this dim")
            if keep:
                out.append(g.fresh(1, "reduced dim"))
        else:
            out.append(xl[d])
    return out


def reduction_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts | None:
    x = a.get("self", a.get("input"))
    dims = a.get("dim")
    if dims is None or (isinstance(dims, list | tuple) and not dims):
        return None
    dims = [dims] if isinstance(dims, int) else dims
    shape = shape_of(x)
    reduced = {int(d) % len(shape) for d in dims}
    count = np.prod([s if s is not None else np.nan for i, s in enumerate(shape) if i in reduced])
    out: Facts = []
    for d in range(len(shape)):
        if d in reduced:
            if a.get("keepdim"):
                out.append(None)
            continue
        f = va.dim(x, d)
        if f is not None and op_name(node) == "aten.sum":
            f = DimFacts(f.const * count, f.cls)
        out.append(f)
    return out


def spread_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts | None:
    """var and std: a slice that is constant along the kept dims has spread 0 (when the count of
    reduced elements exceeds the correction; else the result is NaN); equal slices, equal spreads."""
    means = reduction_values(va, node, a)
    if means is None:
        return None
    x = a.get("self", a.get("input"))
    dims = a.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    shape = shape_of(x)
    reduced = [shape[int(d) % len(shape)] for d in dims]
    correction = a.get("correction")
    if correction is None:
        correction = 1 if a.get("unbiased", True) else 0
    if any(s is None for s in reduced) or int(np.prod(reduced)) <= float(correction):
        return None
    return [None if f is None else DimFacts(np.where(np.isnan(f.const), np.nan, 0.0), f.cls) for f in means]


def reduction_pair(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """var_mean, std_mean: two results, each laid out as the reduction."""
    if not isinstance(node.meta.get("val"), list | tuple):
        raise ValueError(f"{node.name}: expected two results")
    out = _reduced_layout(g, node, a)
    if out is None:
        return pin_unknown(g, node, f"{op_name(node)} {node.name} reduces the whole tensor")
    g.layouts[node] = [out, list(out)]


def pair_values(va: FactStore, node: Node, a: dict[str, Any]) -> list[Facts | None]:
    return [spread_values(va, node, a), reduction_values(va, node, a)]


for _name in ("aten.mean", "aten.sum", "aten.amax", "aten.amin"):
    register_op(_name, reduction, reduction_values)
for _name in ("aten.max", "aten.min"):
    register_op(_name, reduction)
register_op(("aten.var", "aten.std"), reduction, spread_values)
register_op(("aten.var_mean", "aten.std_mean"), reduction_pair, pair_values)


def along_dim(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    xl = list(g.layout(x))
    d = dim_index(int(a["dim"]), len(xl))
    g.pin(xl[d], f"{op_name(node)} {node.name} mixes this dim")
    g.layouts[node] = xl


def softmax_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    x = a.get("self", a.get("input"))
    shape = shape_of(x)
    d = int(a["dim"]) % len(shape)
    out: Facts = []
    for i in range(len(shape)):
        f = va.dim(x, i) if i != d else None
        if f is not None:
            f = DimFacts(np.where(np.isnan(f.const), np.nan, 1.0 / shape[d]) if shape[d] else f.const, f.cls)
        out.append(f)
    return out


register_op(("aten.softmax", "aten._softmax"), along_dim, softmax_values)
register_op(("aten.log_softmax", "aten._log_softmax", "aten.cumsum"), along_dim)


def vector_norm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """A p-norm (p > 0) over some dims: a zero slice adds nothing to it, so those dims are sum sites
    (w / ||w|| written by hand: a weight's zero input columns can go)."""
    out = _reduced_layout(g, node, a, sums=float(a.get("ord", 2)) > 0)
    if out is None:
        return pin_unknown(g, node, f"{op_name(node)} {node.name} reduces the whole tensor")
    g.layouts[node] = out


def vector_norm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts | None:
    """The norms of a parameter are computed (a weight's row norms: known, and non-zero where the row
    is); otherwise a zero slice has norm 0, and equal slices equal norms."""
    x = a["self"]
    if va.has_param(x) and a.get("dim") is not None:
        dims = [a["dim"]] if isinstance(a["dim"], int) else list(a["dim"])
        norms = torch.linalg.vector_norm(va.param(x), a.get("ord", 2), dims, bool(a.get("keepdim")))
        return [facts_of(norms, d) if va.live(node, d) else None for d in range(norms.dim())]
    kept = reduction_values(va, node, a)
    if kept is None:
        return None
    return [None if f is None else DimFacts(np.where(f.const == 0, 0.0, np.nan), f.cls) for f in kept]


register_op("aten.linalg_vector_norm", vector_norm, vector_norm_values)
