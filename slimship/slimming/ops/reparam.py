"""Weights computed in the graph by a reparametrisation: weight normalisation, w = g * v / ||v||.

(Weight standardisation needs no record of its own: it is a `batch_norm` over the weight, or a
mean and a var, whose records follow a weight's rows.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import SUM, ChannelGraph, Site, shape_of
from slimship.slimming.ops.common import dim_index, no_facts, rank_of
from slimship.slimming.ops.mixing import bias_keys
from slimship.slimming.ops.record import register_op


def weight_norm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Slices along `dim` (a conv's output rows) go with their magnitude in `g`; the norm sums over
    the other dims, where a zero slice of `v` can go without changing it."""
    v, gain = a["v"], a["g"]
    vl, gl = list(g.layout(v)), g.layout(gain)
    rank = len(vl)
    dim = int(a.get("dim", 0))
    reason = f"weight norm {node.name}"
    if dim == -1:  # one norm over the whole tensor: a scalar magnitude
        g.pin_layout(gl, reason)
        summed = list(range(rank))
    else:
        dim = dim_index(dim, rank)
        if len(gl) != rank:
            raise ValueError(f"magnitude of rank {len(gl)} for a rank-{rank} weight")
        for d, ids in enumerate(gl):
            if d == dim:
                g.unify(vl[dim], ids, f"{reason} magnitude")
            else:
                g.pin(ids, reason)
        summed = [d for d in range(rank) if d != dim]
    for d in summed:
        if vl[d] is not None and len(vl[d]) > 1:
            g.sites.append(Site(node, SUM, [(v, d)]))
        else:
            g.pin(vl[d], reason)
    g.layouts[node] = vl


def weight_norm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """A row whose magnitude is 0 (and whose norm is not) is zero; rows equal in `v` and `g` are
    equal. When no row has a zero norm, a zero column of `v` is a zero column of the weight."""
    v, gain = a["v"], a["g"]
    out = no_facts(node)
    dim = int(a.get("dim", 0))
    if dim == -1 or not va.has_param(v):
        return out
    dim = dim_index(dim, rank_of(node))
    n = shape_of(v)[dim]
    has_norm = va.param_const(v, dim) != 0  # NaN (unequal entries) or a non-zero constant
    if va.live(node, dim):
        magnitude = va.vector(gain, n)
        rows = va.param_facts(v, dim)
        const = np.where((magnitude == 0) & has_norm, 0.0, np.nan)
        keys = np.stack([rows.cls.astype(np.float64), *bias_keys(magnitude)], axis=1)
        out[dim] = DimFacts(const, relabel(keys, const))
    if has_norm.all():
        for d in range(rank_of(node)):
            if d != dim and va.live(node, d):
                cols = va.param_facts(v, d)
                const = np.where(cols.const == 0, 0.0, np.nan)
                out[d] = DimFacts(const, relabel(cols.cls, const))
    return out


register_op("aten._weight_norm", weight_norm, weight_norm_values)
