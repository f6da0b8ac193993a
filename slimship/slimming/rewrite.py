"""Rewrite: slice (or sum merged columns of) every parameter, then fix the sizes the graph holds."""

from __future__ import annotations

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
)
from slimship.slimming.ops import SizeRule, record_for
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
            record = record_for(op_name(node))
            if record is not None and record.sizes is not None:
                _apply_arg_rule(g, plan, node, record.sizes)
    gm.graph.lint()
    gm.recompile()
    return new


def _apply_arg_rule(g: ChannelGraph, plan: Plan, node: Node, fix: SizeRule) -> None:
    """Fix the sizes a node holds; a rule that cannot read the node leaves it as it was and records it
    in `g.unreadable` (stage "rewrite"), so that the caller slims again with the node pinned."""
    before = (node.target, node.args, node.kwargs)
    try:
        fix(g, plan.keep, node, op_args(node))
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
