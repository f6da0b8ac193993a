"""Coupling rules: one small function per ATen op, keyed by op name.

A rule receives the channel graph, the node and its arguments by schema name; it sets the node's
layout, unifies the positions that must be removed together and registers the sites that mix values.
An op with no rule pins every dimension it touches (`pin_unknown`): unknown means unprunable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import sympy
import torch
from torch.fx import Node

from slimship.slimming.graph import (
    CONV,
    CONV_T,
    DOT,
    LINEAR,
    SUM,
    ChannelGraph,
    Site,
    flat_values,
    get_tensor,
    is_multi,
    is_tensor_node,
    node_inputs,
    op_args,
    op_name,
    pin_touched,
    registrar,
    shape_of,
)

Rule = Callable[[ChannelGraph, Node, dict[str, Any]], None]
RULES: dict[str, Rule] = {}


rule = registrar(RULES)


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
    fn = RULES.get(name)
    if known_unreadable is not None:
        return pin_unknown(g, node, known_unreadable)
    if fn is None:
        if any(is_tensor_node(a) for a in node_inputs(node)) or is_tensor_node(node):
            g.unsupported.setdefault(name, []).append(node.name)
        return pin_unknown(g, node, f"no rule for {name} (node {node.name})")
    edges, sites = len(g._edges), len(g.sites)
    try:
        fn(g, node, op_args(node))
        _check_layout(node, g.layouts.get(node))
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


def pin_unknown(g: ChannelGraph, node: Node, reason: str) -> None:
    """The fallback: every dim of every tensor argument and of the result stays."""
    pin_touched(g, node, reason)
    val = node.meta.get("val")
    if isinstance(val, list | tuple):
        g.layouts[node] = [
            [g.fresh(s, reason) for s in _shape(v)] if isinstance(v, torch.Tensor) else None for v in val
        ]
    else:
        g.layouts[node] = g.fresh_layout(node, pin=reason)


def _shape(val: torch.Tensor) -> list[int | None]:
    return [int(s) if isinstance(s, int) else None for s in val.shape]


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ---- elementwise ------------------------------------------------------------------------------
UNARY = (
    "aten.relu aten.relu_ aten.relu6 aten.gelu aten.silu aten.silu_ aten.hardswish aten.hardswish_ "
    "aten.hardsigmoid aten.hardsigmoid_ aten.sigmoid aten.tanh aten.hardtanh aten.hardtanh_ aten.clamp "
    "aten.clamp_min aten.clamp_max aten.leaky_relu aten.elu aten.mish aten.softplus aten.erf aten.exp "
    "aten.neg aten.abs aten.sqrt aten.rsqrt aten.reciprocal aten.square aten.log aten.pow aten.dropout "
    "aten.feature_dropout aten.alpha_dropout aten.clone aten.contiguous aten.alias aten.detach aten.to "
    "aten._to_copy aten.type_as aten.zeros_like aten.ones_like aten.full_like aten.empty_like "
    "aten.lift_fresh_copy aten.identity aten.detach_"
).split()
BINARY = (
    "aten.add aten.add_ aten.sub aten.sub_ aten.rsub aten.mul aten.mul_ aten.div aten.div_ aten.maximum "
    "aten.minimum aten.where aten.masked_fill aten.eq aten.ne aten.gt aten.lt aten.ge aten.le "
    "aten.bitwise_and aten.bitwise_or aten.logical_and aten.logical_or aten.logical_not aten.bitwise_not "
    "aten.__and__ aten.__or__ aten.__xor__"
).split()


@rule(*UNARY, *BINARY)
def pointwise(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Broadcasting elementwise op: each full-size operand dim shares the output's positions."""
    out_shape = shape_of(node)
    rank = len(out_shape)
    out: list[np.ndarray | None] = [None] * rank
    tensors = [v for v in flat_values(list(a.values())) if is_tensor_node(v)]
    for d in range(rank):
        for t in tensors:
            t_shape = shape_of(t)
            td = d - (rank - len(t_shape))
            if td < 0:
                continue
            ids = g.layout(t)[td]
            if t_shape[td] == 1 and out_shape[d] != 1:
                g.pin(ids, f"{op_name(node)} broadcasts this dim")  # its one position cannot go
                continue
            if out[d] is None and ids is not None:
                out[d] = ids
            else:
                g.unify(out[d], ids, f"{op_name(node)} operands")
    for d in range(rank):
        if out[d] is None and out_shape[d] is not None:
            out[d] = g.fresh(out_shape[d], pin=f"{op_name(node)} broadcast")
    g.layouts[node] = out


# ---- layers -----------------------------------------------------------------------------------
@rule("aten.linear")
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


@rule("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution")
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


@rule("aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d")
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


@rule("aten.batch_norm", "aten._native_batch_norm_legit_no_training", "aten.instance_norm")
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


@rule("aten.group_norm")
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


@rule("aten.layer_norm", "aten.native_layer_norm", "aten.native_group_norm")
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
        g.layouts[node] = [xl, *[_fresh_layout_of(g, v, reason) for v in node.meta["val"][1:]]]
    else:
        g.layouts[node] = xl


def _fresh_layout_of(g: ChannelGraph, val: torch.Tensor, reason: str) -> list[np.ndarray | None]:
    return [g.fresh(s, reason) for s in _shape(val)]


@rule("aten.embedding")
def embedding(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    w, idx = a["weight"], a["indices"]
    wl = g.layout(w)
    g.pin(wl[0], "embedding vocabulary")
    g.layouts[node] = [*g.layout(idx), wl[1]]


# ---- per-channel spatial ops ------------------------------------------------------------------
@rule(
    "aten.max_pool1d",
    "aten.max_pool2d",
    "aten.max_pool3d",
    "aten.avg_pool1d",
    "aten.avg_pool2d",
    "aten.avg_pool3d",
    "aten.adaptive_avg_pool1d",
    "aten.adaptive_avg_pool2d",
    "aten.adaptive_avg_pool3d",
    "aten.adaptive_max_pool2d",
    "aten.upsample_nearest1d",
    "aten.upsample_nearest2d",
    "aten.upsample_bilinear2d",
    "aten.upsample_bicubic2d",
    "aten.upsample_linear1d",
    "aten.max_pool2d_with_indices",
)
def channelwise_spatial(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """Batch and channel dims pass through; spatial dims are new."""
    xl = g.layout(a.get("input", a.get("self")))
    val = node.meta["val"]
    vals = val if isinstance(val, list | tuple) else [val]
    layouts = []
    for v in vals:
        shape = _shape(v)
        lead = 2 if len(shape) == len(xl) else 1  # unbatched inputs have channels first
        layouts.append(list(xl[:lead]) + [g.fresh(s, "spatial dim") for s in shape[lead:]])
    g.layouts[node] = layouts if isinstance(val, list | tuple) else layouts[0]


# ---- reductions -------------------------------------------------------------------------------
@rule("aten.mean", "aten.sum", "aten.amax", "aten.amin", "aten.max", "aten.min", "aten.var", "aten.std")
def reduction(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    xl = g.layout(x)
    dims = a.get("dim")
    if isinstance(dims, int):
        dims = [dims]
    name = op_name(node)
    if dims is None or len(dims) == 0 or isinstance(node.meta.get("val"), list | tuple):
        return pin_unknown(g, node, f"{name} {node.name} reduces the whole tensor")
    rank = len(xl)
    reduced = {_dim(int(d), rank) for d in dims}
    keep = bool(a.get("keepdim"))
    out: list[np.ndarray | None] = []
    for d in range(rank):
        if d in reduced:
            if name == "aten.sum" and xl[d] is not None and len(xl[d]) > 1:
                g.sites.append(Site(node, SUM, [(x, d)]))
            else:
                g.pin(xl[d], f"{name} {node.name} reduces this dim")
            if keep:
                out.append(g.fresh(1, "reduced dim"))
        else:
            out.append(xl[d])
    g.layouts[node] = out


@rule("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax", "aten.cumsum")
def along_dim(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    xl = list(g.layout(x))
    d = _dim(int(a["dim"]), len(xl))
    g.pin(xl[d], f"{op_name(node)} {node.name} mixes this dim")
    g.layouts[node] = xl


# ---- products ---------------------------------------------------------------------------------
@rule("aten.matmul", "aten.bmm", "aten.mm")
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


@rule("aten.addmm")
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


@rule("aten.scaled_dot_product_attention")
def sdpa(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    q, k, v = a["query"], a["key"], a["value"]
    ql, kl, vl = g.layout(q), g.layout(k), g.layout(v)
    if a.get("enable_gqa") or shape_of(q)[:-2] != shape_of(k)[:-2]:
        return pin_unknown(g, node, f"attention {node.name} with grouped/broadcast heads")
    for d in range(len(ql) - 2):
        g.unify(ql[d], kl[d], "attention heads")
        g.unify(ql[d], vl[d], "attention heads")
    g.unify(kl[-2], vl[-2], "attention keys")
    g.pin(kl[-2], "attention key positions")
    g.unify(ql[-1], kl[-1], "attention head dim")
    g.sites.append(Site(node, DOT, [(q, len(ql) - 1), (k, len(kl) - 1)]))
    mask = a.get("attn_mask")
    if mask is not None:
        _attention_mask(g, node, mask, [*ql[:-1], kl[-2]])
    g.layouts[node] = list(ql[:-1]) + [vl[-1]]


def _attention_mask(g: ChannelGraph, node: Node, mask: Node, scores: list[np.ndarray | None]) -> None:
    """The mask broadcasts against the scores (batch..., heads, queries, keys): a dim it does not
    broadcast shares the scores' positions (CoAtNet's per-head relative-position bias removes a head
    with the head); its query and key dims stay."""
    ml, m_shape = g.layout(mask), shape_of(mask)
    for md in range(len(ml)):
        d = len(scores) - len(ml) + md
        if d >= len(scores) - 2 or d < 0:
            g.pin(ml[md], f"attention mask of {node.name}")
        elif m_shape[md] == 1 and (scores[d] is None or len(scores[d]) != 1):
            g.pin(ml[md], f"attention mask of {node.name} broadcasts this dim")
        else:
            g.unify(scores[d], ml[md], f"attention mask of {node.name}")


# ---- shape ops --------------------------------------------------------------------------------
@rule("aten.permute")
def permute(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = g.layout(a["self"])
    g.layouts[node] = [xl[_dim(int(d), len(xl))] for d in a["dims"]]


@rule("aten.transpose", "aten.swapaxes")
def transpose(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d0, d1 = _dim(int(a["dim0"]), len(xl)), _dim(int(a["dim1"]), len(xl))
    xl[d0], xl[d1] = xl[d1], xl[d0]
    g.layouts[node] = xl


@rule("aten.t", "aten.numpy_T")
def t(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    g.layouts[node] = list(reversed(g.layout(a["self"])))


@rule("aten.unsqueeze")
def unsqueeze(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d = _dim(int(a["dim"]), len(xl) + 1)
    g.layouts[node] = xl[:d] + [g.fresh(1, "unit dim")] + xl[d:]


@rule("aten.squeeze")
def squeeze(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl, shape = g.layout(x), shape_of(x)
    dims = a.get("dim")
    if dims is None:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        drop = {_dim(int(d), len(xl)) for d in dims if shape[_dim(int(d), len(xl))] == 1}
    g.layouts[node] = [ids for i, ids in enumerate(xl) if i not in drop]


@rule("aten.expand", "aten.expand_as")
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


@rule("aten.cat", "aten.concat", "aten.concatenate")
def cat(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    tensors = [t for t in a["tensors"] if is_tensor_node(t) and shape_of(t) != [0]]
    rank = len(shape_of(node))
    d = _dim(int(a.get("dim") or 0), rank)
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


@rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split", "aten.tensor_split")
def split(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl = g.layout(x)
    d = _dim(int(a.get("dim") or 0), len(xl))
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


@rule("aten.unbind")
def unbind(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    xl = g.layout(x)
    d = _dim(int(a.get("dim") or 0), len(xl))
    g.pin(xl[d], f"unbind {node.name}")
    g.layouts[node] = [list(xl[:d]) + list(xl[d + 1 :]) for _ in node.meta["val"]]


@rule("getitem")
def getitem(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    source, index = node.args
    layout = g.layout(source)
    if layout is None or not is_multi(layout) or not isinstance(index, int):
        return pin_unknown(g, node, f"getitem {node.name}")
    g.layouts[node] = layout[index]


@rule("aten.slice", "aten.narrow")
def slice_(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    xl = list(g.layout(x))
    d = _dim(int(a.get("dim") or 0), len(xl))
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


@rule("aten.select")
def select(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    xl = list(g.layout(a["self"]))
    d = _dim(int(a["dim"]), len(xl))
    g.pin(xl[d], f"select {node.name} picks an index of this dim")
    g.layouts[node] = xl[:d] + xl[d + 1 :]


#: ops that only regroup a tensor's dims (the coupling and the value table share this list)
RESHAPES = (
    "aten.view",
    "aten.reshape",
    "aten._unsafe_view",
    "aten.flatten",
    "aten.unflatten",
    "aten.view_as",
    "aten.reshape_as",
)


@rule(*RESHAPES)
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


# ---- no-tensor ops ---------------------------------------------------------------------------
@rule("aten.sym_size", "aten.sym_numel", "aten.sym_stride", "aten._assert_tensor_metadata")
def no_layout(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    g.layouts[node] = None


@rule(
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
def factory(g: ChannelGraph, node: Node, a: dict[str, Any]) -> None:
    """A new tensor (`new_*` read only their operand's dtype and device): its dims stay."""
    g.layouts[node] = g.fresh_layout(node, pin=f"constant tensor {node.name}")
