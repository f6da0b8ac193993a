"""Convolution, pooling and upsampling: channels pass through or mix through a weight; spatial dims stay."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    CONV,
    CONV_T,
    ChannelGraph,
    Site,
    op_name,
    set_op_arg,
    shape_of,
)
from slimship.slimming.ops.common import (
    concrete_sizes,
    new_size,
    no_facts,
    rank_of,
)
from slimship.slimming.ops.mixing import bias_keys, computed_weight_out, mixing_out
from slimship.slimming.ops.record import register_op


def conv(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x, w, b = a["input"], a["weight"], a.get("bias")
    if a.get("transposed"):
        return conv_transpose(g, node, a)
    xl, wl = g.layout(x), g.layout(w)
    groups = int(a.get("groups") or 1)
    rank = len(shape_of(node))
    out: list[np.ndarray | None] = [xl[0], wl[0]]
    out += [g.fresh(s, pin="spatial dim") for s in shape_of(node)[2:rank]]
    for kd in range(2, len(wl)):
        g.pin(wl[kd], "kernel dim")
    if b is not None:
        g.unify(wl[0], g.layout(b)[0], "conv bias")
    in_ch, out_ch = shape_of(x)[1], shape_of(node)[1]
    if groups == 1:
        g.unify(xl[1], wl[1], "conv input channels")
        g.consumer_dims.add((w, 1))
        padding = a.get("padding")
        zero_pad = padding in (None, "valid") or (not isinstance(padding, str) and not any(padding))
        g.sites.append(Site(node, CONV, [(x, 1), (w, 1)], weight=w, weight_dim=1, bias=b, foldable=zero_pad))
    elif groups == in_ch == out_ch:  # depthwise: channel c in -> channel c out
        g.pin(wl[1], "depthwise kernel dim")
        g.unify(xl[1], wl[0], "depthwise conv channels")
    else:
        reason = f"grouped convolution {node.name} (groups={groups}) keeps its channels"
        g.pin(xl[1], reason)
        g.pin(wl[0], reason)
        g.pin(wl[1], reason)
    g.layouts[node] = out


def conv_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    result = no_facts(node)
    if not va.live(node, 1) or a.get("transposed"):  # a transposed weight is [in, out]: no facts
        return result
    x, w, b = a["input"], a["weight"], a.get("bias")
    out_ch = shape_of(node)[1]
    bias = va.vector(b, out_ch) if b is not None else None
    groups = int(a.get("groups") or 1)
    in_ch = shape_of(x)[1]
    padding = a.get("padding")
    zero_pad = padding in (None, "valid") or (not isinstance(padding, str) and not any(padding))
    if groups == 1 and va.has_param(w):
        result[1] = mixing_out(va, va.param(w).detach(), bias, va.dim(x, 1), exact_const=zero_pad)
    elif groups == 1:
        result[1] = computed_weight_out(va, w, bias, out_ch)
    elif groups == in_ch == out_ch:
        facts = va.dim_or_unknown(x, 1, in_ch)
        wf = va.dim_or_unknown(w, 0, in_ch)
        b = bias if bias is not None else np.zeros(in_ch)
        vanish = (facts.const == 0) | (wf.const == 0)
        const = np.where(vanish, b, np.nan)
        keys = np.stack([facts.cls.astype(np.float64), wf.cls.astype(np.float64), *bias_keys(b)], axis=1)
        result[1] = DimFacts(const, relabel(keys, const))
    return result


def depthwise_groups(g: ChannelGraph, keep: np.ndarray, node: Node, a: dict[str, Any]) -> None:
    """A depthwise convolution has one group per channel: the group count follows the channels."""
    groups = int(a.get("groups") or 1)
    if groups > 1 and groups == shape_of(a["input"])[1] == shape_of(node)[1]:
        size = new_size(g, keep, node, 1)
        if size is not None and size != groups:
            set_op_arg(node, "groups", size)


register_op(
    ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution"),
    coupling=conv,
    values=conv_values,
    sizes=depthwise_groups,
)


def conv_transpose(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x, w, b = a["input"], a["weight"], a.get("bias")
    xl, wl = g.layout(x), g.layout(w)
    groups = int(a.get("groups") or 1)
    out: list[np.ndarray | None] = [xl[0], wl[1]]
    out += [g.fresh(s, pin="spatial dim") for s in shape_of(node)[2:]]
    for kd in range(2, len(wl)):
        g.pin(wl[kd], "kernel dim")
    if b is not None:
        g.unify(wl[1], g.layout(b)[0], "conv_transpose bias")
    if groups == 1:
        g.unify(xl[1], wl[0], "conv_transpose input channels")
        g.consumer_dims.add((w, 0))
        g.sites.append(Site(node, CONV_T, [(x, 1), (w, 0)], weight=w, weight_dim=0, bias=b, foldable=False))
    else:
        reason = f"grouped transposed convolution {node.name} keeps its channels"
        for ids in (xl[1], wl[0], wl[1]):
            g.pin(ids, reason)
    g.layouts[node] = out


register_op(
    ("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"),
    coupling=conv_transpose,
    fixed_sizes="its sizes act on spatial dims, or on the channels of a grouped one, which stay",
)


def channelwise_spatial(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Batch and channel dims pass through; spatial dims are new."""
    xl = g.layout(a.get("input", a.get("self")))
    val = node.meta["val"]
    vals = val if isinstance(val, list | tuple) else [val]
    layouts = []
    for v in vals:
        shape = concrete_sizes(v)
        lead = 2 if len(shape) == len(xl) else 1  # unbatched inputs have channels first
        layouts.append(list(xl[:lead]) + [g.fresh(s, "spatial dim") for s in shape[lead:]])
    g.layouts[node] = layouts if isinstance(val, list | tuple) else layouts[0]


def _channelwise_values(keeps_constant: bool) -> Any:
    """Batch and channel facts pass through: all of them (`keeps_constant`, a max pool, an upsample)
    or only zeros (an average pool, whose zero padding breaks other constants)."""

    def values(va: FactStore, node: Node, a: dict[str, Any]) -> Any:
        x = a.get("input", a.get("self"))
        xf = [va.dim(x, d) for d in range(len(shape_of(x)))]
        lead = 2 if isinstance(node.meta["val"], torch.Tensor) and rank_of(node) == len(xf) else 1
        facts: Facts = []
        for d in range(lead):
            f = xf[d]
            if f is not None and not keeps_constant:
                f = DimFacts(np.where(f.const == 0, 0.0, np.nan), f.cls)
            facts.append(f)
        val = node.meta["val"]
        if isinstance(val, list | tuple):
            return [facts + [None] * (len(v.shape) - lead) for v in val]
        return facts + [None] * (rank_of(node) - lead)

    return values


#: per-channel spatial ops, and whether a channel's constant survives them (zeros always do)
POOLS = {
    "aten.max_pool1d": True,
    "aten.max_pool2d": True,
    "aten.max_pool3d": True,
    "aten.max_pool2d_with_indices": True,
    "aten.adaptive_avg_pool1d": True,
    "aten.adaptive_avg_pool2d": True,
    "aten.adaptive_avg_pool3d": True,
    "aten.adaptive_max_pool2d": True,
    "aten.upsample_nearest1d": True,
    "aten.upsample_nearest2d": True,
    "aten.upsample_bilinear2d": True,
    "aten.upsample_bicubic2d": True,
    "aten.upsample_linear1d": True,
    "aten.avg_pool1d": False,
    "aten.avg_pool2d": False,
    "aten.avg_pool3d": False,
}
for _name, _keeps in POOLS.items():
    register_op(
        _name,
        coupling=channelwise_spatial,
        values=_channelwise_values(_keeps),
        fixed_sizes="kernel, stride, padding and output sizes act on spatial dims, which stay",
    )


def _padded_dims(a: dict[str, Any], rank: int) -> set[int]:
    """The dims a pad call pads or crops: widths come in (before, after) pairs from the last dim."""
    widths = list(a["pad"] if "pad" in a else a["padding"])
    if len(widths) % 2 or len(widths) // 2 > rank:
        raise ValueError(f"{len(widths)} pad widths for a rank-{rank} tensor")
    return {
        rank - 1 - k
        for k in range(len(widths) // 2)
        if not all(isinstance(w, int) and w == 0 for w in widths[2 * k : 2 * k + 2])
    }


def pad(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Padding keeps the dims it does not pad; a padded (or cropped) dim stays."""
    xl = list(g.layout(a["self"]))
    reason = f"{op_name(node)} {node.name} pads this dim"
    out_shape = shape_of(node)
    for d in _padded_dims(a, len(xl)):
        g.pin(xl[d], reason)
        xl[d] = g.fresh(out_shape[d], reason)
    g.layouts[node] = xl


def pad_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """Slices along a dim that is not padded keep their equality; a constant survives when the fill
    equals it (constant mode) or copies it (reflect, replicate, circular)."""
    x = a["self"]
    rank = len(shape_of(x))
    padded = _padded_dims(a, rank)
    copies = (
        a.get("mode", "constant") != "constant"
        or "reflection" in op_name(node)
        or "replication" in op_name(node)
    )
    fill = a.get("value")
    fill = 0.0 if fill is None else float(fill)
    out: Facts = []
    for d in range(rank):
        f = va.dim(x, d)
        if d in padded or f is None:
            out.append(None)
        elif copies or not padded:
            out.append(f)
        else:
            out.append(DimFacts(np.where(f.const == fill, f.const, np.nan), f.cls))
    return out


for _name in (
    "aten.pad",
    "aten.constant_pad_nd",
    "aten.reflection_pad1d",
    "aten.reflection_pad2d",
    "aten.reflection_pad3d",
    "aten.replication_pad1d",
    "aten.replication_pad2d",
    "aten.replication_pad3d",
):
    register_op(_name, pad, pad_values, fixed_sizes="its widths are those of the dims it pads, which stay")
