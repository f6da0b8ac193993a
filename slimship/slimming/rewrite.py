"""Rewrite: slice (or sum merged columns of) every parameter, then fix the sizes the graph holds."""

from __future__ import annotations

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


def rewrite(g: ChannelGraph, plan: Plan) -> dict[str, torch.Tensor]:
    """Apply `plan` to `g.gm` in place; returns the new tensors by qualified name."""
    gm = g.gm
    tensors = {
        str(n.target): (n, get_tensor(gm, str(n.target))) for n in gm.graph.nodes if n.op == "get_attr"
    }
    # every change below builds a new tensor (nothing is written in place), so no copies up front
    start = {name: t.detach() for name, (_, t) in tensors.items()}
    new: dict[str, torch.Tensor] = dict(start)
    _apply_folds(plan, new)
    _apply_merges(g, plan, tensors, new)
    for name, (node, _) in tensors.items():
        layout = g.layouts.get(node)
        tensor = new[name]
        for d, ids in enumerate(layout or []):
            if ids is None or not len(ids):
                continue
            keep = plan.keep[g.component[ids]]
            if not keep.all():
                tensor = tensor.index_select(d, torch.from_numpy(np.flatnonzero(keep)))
        new[name] = tensor
    for name, tensor in new.items():
        if tensor is not start[name]:  # unchanged tensors stay where they are
            _set(gm, name, tensor)
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


def _apply_folds(plan: Plan, new: dict[str, torch.Tensor]) -> None:
    for fold in plan.folds:
        weight = new[str(fold.site.weight.target)]
        bias = new[str(fold.site.bias.target)]
        columns = weight.index_select(fold.site.weight_dim, torch.from_numpy(fold.positions)).double()
        if fold.site.kind == CONV:
            columns = columns.sum(dim=tuple(range(2, columns.dim())))
        elif fold.site.weight_dim == 0:  # a linear weight stored [in, out] (addmm)
            columns = columns.t()
        shift = columns @ torch.from_numpy(fold.consts)
        new[str(fold.site.bias.target)] = (bias.double() + shift).to(bias.dtype)


def _apply_merges(g: ChannelGraph, plan: Plan, tensors: dict[str, Any], new: dict[str, torch.Tensor]) -> None:
    if not plan.merged_into:
        return
    done: set[tuple[str, int]] = set()
    for node, d in g.consumer_dims:
        key = (str(node.target), d)
        if key in done or node.op != "get_attr":
            continue
        done.add(key)
        comps = g.component[g.layouts[node][d]]
        tensor = new[key[0]]
        for other, rep in plan.merged_into.items():
            src = np.flatnonzero(comps == other)
            if not len(src):
                continue
            dst = np.flatnonzero(comps == rep)
            tensor = tensor.index_add(d, torch.from_numpy(dst), tensor.index_select(d, torch.from_numpy(src)))
        new[key[0]] = tensor


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
