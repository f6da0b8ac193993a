"""Rewrite: slice (or sum merged columns of) every parameter, then fix the sizes the graph holds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import Node

from slimship.slimming.graph import (
    CONV,
    ChannelGraph,
    get_tensor,
    op_args,
    op_name,
    registrar,
    set_op_arg,
    shape_of,
)
from slimship.slimming.plan import Plan

#: Called with (qualified name, new tensor as set on the graph) right after each tensor is replaced.
Release = Callable[[str, torch.Tensor], None]


def rewrite(g: ChannelGraph, plan: Plan, release: Release | None = None) -> dict[str, torch.Tensor]:
    """Apply `plan` to `g.gm` in place, one tensor at a time; returns the tensors by qualified name.

    Folds are taken first (they read other tensors' columns); then each tensor is merged, sliced and
    set on the graph before the next is read, and `release(name, new)` lets the caller drop the dense
    tensor wherever else it is held, so at most one dense tensor beyond the model is alive. Nothing is
    written in place: the dense tensors stay as they were for whoever still holds them.
    """
    gm = g.gm
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "get_attr"}
    shifts = _fold_shifts(plan, gm)
    merges = _merge_dims(g, plan)
    new: dict[str, torch.Tensor] = {}
    for name, node in nodes.items():
        dense = get_tensor(gm, name).detach()
        tensor = dense
        if name in shifts:
            tensor = (tensor.double() + shifts.pop(name)).to(tensor.dtype)
        for d, pairs in merges.get(name, ()):
            for dst, src in pairs:
                tensor = tensor.index_add(d, dst, tensor.index_select(d, src))
        for d, ids in enumerate(g.layouts.get(node) or []):
            if ids is None or not len(ids):
                continue
            keep = plan.keep[g.component[ids]]
            if not keep.all():
                tensor = tensor.index_select(d, torch.from_numpy(np.flatnonzero(keep)))
        if tensor is dense:  # unchanged tensors stay where they are
            new[name] = dense
            continue
        del dense
        _set(gm, name, tensor)
        new[name] = get_tensor(gm, name)
        del tensor
        if release is not None:
            release(name, new[name])
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            fix = ARG_RULES.get(op_name(node))
            if fix is not None:
                _apply_arg_rule(g, plan, node, fix)
    gm.graph.lint()
    gm.recompile()
    return new


def _apply_arg_rule(g: ChannelGraph, plan: Plan, node: Node, fix: ArgRule) -> None:
    """Fix the sizes a node holds; a rule that cannot read the node leaves it as it was and records it
    in `g.unreadable` (stage "rewrite"), so that the caller slims again with the node pinned."""
    before = (node.target, node.args, node.kwargs)
    try:
        fix(g, plan, node, op_args(node))
    except Exception as exc:  # unknown means unprunable: the caller pins this node and slims again
        node.target, node.args, node.kwargs = before
        g.record_unreadable(node, "rewrite", exc)


def _fold_shifts(plan: Plan, gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Per bias, the (float64) sum its folded constant channels add, read from the dense weights."""
    shifts: dict[str, torch.Tensor] = {}
    for fold in plan.folds:
        weight = get_tensor(gm, str(fold.site.weight.target)).detach()
        columns = weight.index_select(fold.site.weight_dim, torch.from_numpy(fold.positions)).double()
        if fold.site.kind == CONV:
            columns = columns.sum(dim=tuple(range(2, columns.dim())))
        elif fold.site.weight_dim == 0:  # a linear weight stored [in, out] (addmm)
            columns = columns.t()
        shift = columns @ torch.from_numpy(fold.consts)
        name = str(fold.site.bias.target)
        shifts[name] = shifts[name] + shift if name in shifts else shift
    return shifts


def _merge_dims(g: ChannelGraph, plan: Plan) -> dict[str, list[tuple[int, list[Any]]]]:
    """Per consumer tensor: (dim, [(representative positions, merged positions)]) whose columns are
    summed into their representative's before the merged ones are sliced away."""
    out: dict[str, list[tuple[int, list[Any]]]] = {}
    if not plan.merged_into:
        return out
    done: set[tuple[str, int]] = set()
    for node, d in g.consumer_dims:
        key = (str(node.target), d)
        if key in done or node.op != "get_attr":
            continue
        done.add(key)
        comps = g.component[g.layouts[node][d]]
        pairs = []
        for other, rep in plan.merged_into.items():
            src = np.flatnonzero(comps == other)
            if len(src):
                pairs.append((torch.from_numpy(np.flatnonzero(comps == rep)), torch.from_numpy(src)))
        if pairs:
            out.setdefault(key[0], []).append((d, pairs))
    return out


def _set(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor) -> None:
    prefix, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    old = getattr(owner, leaf)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor.contiguous()
    else:
        setattr(owner, leaf, tensor.contiguous())


# ---- sizes held by the graph -------------------------------------------------------------------
def new_size(g: ChannelGraph, plan: Plan, node: Node, d: int) -> int | None:
    layout = g.layouts.get(node)
    if layout is None or d >= len(layout) or layout[d] is None:
        return None
    return int(plan.keep[g.component[layout[d]]].sum())


ArgRule = Callable[[ChannelGraph, Plan, Node, dict[str, Any]], None]
ARG_RULES: dict[str, ArgRule] = {}


arg_rule = registrar(ARG_RULES)


@arg_rule("aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand")
def shape_list(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    key = "size" if "size" in a else "shape"
    sizes = list(a[key])
    offset = len(shape_of(node)) - len(sizes)
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            size = new_size(g, plan, node, i + offset)
            if size is not None:
                sizes[i] = size
    set_op_arg(node, key, sizes)


@arg_rule("aten.unflatten")
def unflatten(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    d = int(a["dim"]) % len(shape_of(a["self"]))
    sizes = list(a["sizes"])
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s != -1:
            size = new_size(g, plan, node, d + i)
            if size is not None:
                sizes[i] = size
    set_op_arg(node, "sizes", sizes)


@arg_rule("aten.split", "aten.split_with_sizes", "aten.chunk")
def split(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    x = a["self"]
    d = int(a.get("dim") or 0) % len(shape_of(x))
    layouts = g.layouts.get(node)
    if not layouts or layouts[0][d] is None:
        return
    sizes = [int(plan.keep[g.component[lay[d]]].sum()) for lay in layouts]
    old = [int(v.shape[d]) for v in node.meta["val"]]
    if sizes != old:
        node.target = torch.ops.aten.split_with_sizes.default
        node.args, node.kwargs = (x, sizes, d), {}


@arg_rule("aten.slice", "aten.narrow")
def slice_bounds(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    x = a.get("self", a.get("input"))
    d = int(a.get("dim") or 0) % len(shape_of(x))
    layout = g.layouts.get(x)
    if layout is None or layout[d] is None:
        return
    keep = plan.keep[g.component[layout[d]]]
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


@arg_rule("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution")
def depthwise_groups(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    """A depthwise convolution has one group per channel: the group count follows the channels."""
    groups = int(a.get("groups") or 1)
    if groups > 1 and groups == shape_of(a["input"])[1] == shape_of(node)[1]:
        size = new_size(g, plan, node, 1)
        if size is not None and size != groups:
            set_op_arg(node, "groups", size)


@arg_rule("aten.group_norm")
def group_count(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    """Whole groups are removed: the group count shrinks by the groups that went."""
    channels = shape_of(a["input"])[1]
    size = new_size(g, plan, node, 1)
    if size is not None and size != channels:
        set_op_arg(node, "num_groups", size // (channels // int(a["num_groups"])))


@arg_rule("aten.scaled_dot_product_attention")
def attention_scale(g: ChannelGraph, plan: Plan, node: Node, a: dict[str, Any]) -> None:
    """A narrower head dim must not change the softmax scale: pin it to the original value."""
    q = a["query"]
    head_dim = shape_of(q)[-1]
    if a.get("scale") is None and new_size(g, plan, q, len(shape_of(q)) - 1) not in (None, head_dim):
        kwargs = dict(node.kwargs)
        kwargs["scale"] = 1.0 / math.sqrt(head_dim)
        node.kwargs = kwargs
