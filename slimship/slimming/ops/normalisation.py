"""Normalisation: per-channel norms pass channels through; norms over channels pin them."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    ChannelGraph,
    op_name,
    set_op_arg,
    shape_of,
)
from slimship.slimming.ops.common import (
    fresh_layout_of,
    new_size,
    pin_unknown,
)
from slimship.slimming.ops.mixing import bias_keys
from slimship.slimming.ops.record import register_op


def batch_norm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["input"]
    xl = g.layout(x)
    for name in ("weight", "bias", "running_mean", "running_var"):
        p = a.get(name)
        if p is not None:
            g.unify(xl[1], g.layout(p)[0], f"{op_name(node)} {name}")
            if name == "running_var":
                g.stat_dims.add((p, 0))
    own_stats = op_name(node) == "aten.instance_norm" or (
        op_name(node) == "aten.batch_norm"
        and (a.get("training") or a.get("running_mean") is None or a.get("running_var") is None)
    )
    if own_stats:  # statistics over every other dim (BiT's weight standardisation): those dims mix
        reason = f"{op_name(node)} {node.name} normalises with statistics over this dim"
        for d, ids in enumerate(xl):
            if d != 1 and not (d == 0 and op_name(node) == "aten.instance_norm"):
                g.pin(ids, reason)
    if op_name(node) == "aten._native_batch_norm_legit_no_training":
        g.layouts[node] = [list(xl), [g.fresh(0)], [g.fresh(0)]]
    else:
        g.layouts[node] = list(xl)


def batch_norm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Any:
    x = a["input"]
    n = shape_of(x)[1]
    facts = va.dim_or_unknown(x, 1, n)

    def vec(name: str, default: float) -> np.ndarray:
        p = a.get(name)
        return va.vector(p, n) if p is not None else np.full(n, default)

    if a.get("training") or a.get("running_mean") is None or a.get("running_var") is None:
        return _batch_stats_norm(va, node, a)  # normalised by its own statistics, like instance_norm
    scale = vec("weight", 1.0) / np.sqrt(vec("running_var", 1.0) + float(a["eps"]))
    shift = vec("bias", 0.0) - vec("running_mean", 0.0) * scale
    const = np.where(scale == 0, shift, facts.const * scale + shift)
    keys = np.stack([facts.cls.astype(np.float64), *bias_keys(scale), *bias_keys(shift)], axis=1)
    out: Facts = [None] * len(shape_of(x))
    out[1] = DimFacts(const, relabel(keys, const))
    if op_name(node) == "aten._native_batch_norm_legit_no_training":
        return [out, None, None]
    return out


def instance_norm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    return _batch_stats_norm(va, node, a)


def _batch_stats_norm(va: FactStore, node: Node, a: dict[str, Any]) -> Any:
    """A per-channel norm with its own statistics: a constant channel normalises to its bias."""
    x = a["input"]
    n = shape_of(x)[1]
    facts = va.dim_or_unknown(x, 1, n)
    w = va.vector(a["weight"], n) if a.get("weight") is not None else np.ones(n)
    b = va.vector(a["bias"], n) if a.get("bias") is not None else np.zeros(n)
    const = np.where(~np.isnan(facts.const) | (w == 0), b, np.nan)
    out: Facts = [None] * len(shape_of(x))
    keys = np.stack([facts.cls.astype(np.float64), *bias_keys(w), *bias_keys(b)], axis=1)
    out[1] = DimFacts(const, relabel(keys, const))
    if op_name(node) == "aten._native_batch_norm_legit_no_training":
        return [out, None, None]
    return out


register_op(("aten.batch_norm", "aten._native_batch_norm_legit_no_training"), batch_norm, batch_norm_values)
register_op("aten.instance_norm", batch_norm, instance_norm_values)


def group_norm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """The channels of one group are normalised together, so a whole group is one removable unit."""
    x = a["input"]
    xl = list(g.layout(x))
    ids = xl[1]
    groups = int(a["num_groups"])
    if ids is None:
        return pin_unknown(g, node, f"group_norm {node.name} on a dynamic channel dim")
    size = len(ids) // groups
    for k in range(groups):
        block = ids[k * size : (k + 1) * size]
        g.unify(block[:-1], block[1:], f"group_norm {node.name} group")
    for p in (a.get("weight"), a.get("bias")):
        if p is not None:
            g.unify(ids, g.layout(p)[0], "group_norm affine")
    g.layouts[node] = xl


def group_norm_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """A group whose input channels are all constant normalises to zero: the output is the bias."""
    x = a["input"]
    n = shape_of(x)[1]
    groups = int(a["num_groups"])
    facts = va.dim_or_unknown(x, 1, n)
    w = va.vector(a["weight"], n) if a.get("weight") is not None else np.ones(n)
    b = va.vector(a["bias"], n) if a.get("bias") is not None else np.zeros(n)
    group_const = (~np.isnan(facts.const)).reshape(groups, -1).all(axis=1).repeat(n // groups)
    const = np.where(group_const | (w == 0), b, np.nan)
    out: Facts = [None] * len(shape_of(x))
    size = n // groups
    group_label = relabel(facts.cls.reshape(groups, size), np.full(groups, np.nan)).repeat(size)
    offset = np.tile(np.arange(size), groups)
    keys = np.stack(
        [group_label.astype(np.float64), offset.astype(np.float64), *bias_keys(w), *bias_keys(b)], axis=1
    )
    out[1] = DimFacts(const, relabel(keys, const))
    return out


def group_count(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    """Whole groups are removed: the group count shrinks by the groups that went."""
    channels = shape_of(a["input"])[1]
    size = new_size(g, keep, node, 1)
    if size is not None and size != channels:
        set_op_arg(node, "num_groups", size // (channels // int(a["num_groups"])))


register_op("aten.group_norm", coupling=group_norm, values=group_norm_values, sizes=group_count)


def mixing_norm(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Normalisation that mixes a channel dimension: those dims stay."""
    x = a["input"]
    xl = list(g.layout(x))
    name = op_name(node)
    reason = f"{name} {node.name} normalises over its channels"
    if "layer_norm" in name:
        k = len(a["normalized_shape"])
        mixed = list(range(len(xl) - k, len(xl)))
        for p in (a.get("weight"), a.get("bias")):
            if p is not None:
                for pd, d in enumerate(mixed):
                    g.unify(xl[d], g.layout(p)[pd], reason)
    else:
        mixed = [1]
        for p in (a.get("weight"), a.get("bias")):
            if p is not None:
                g.unify(xl[1], g.layout(p)[0], reason)
    for d in mixed:
        g.pin(xl[d], reason)
    if name.startswith("aten.native"):
        g.layouts[node] = [xl, *[fresh_layout_of(g, v, reason) for v in node.meta["val"][1:]]]
    else:
        g.layouts[node] = xl


register_op(
    "aten.layer_norm",
    mixing_norm,
    fixed_sizes="normalized_shape names the normalised dims, which stay",
)
register_op("aten.native_layer_norm", mixing_norm, fixed_sizes="normalized_shape names dims that stay")
register_op("aten.native_group_norm", mixing_norm, fixed_sizes="its sizes name the channels, which stay")
