"""Elementwise ops: broadcast operands share positions; values: the op applied to per-slice constants."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.facts import DimFacts, Facts, FactStore, relabel
from slimship.slimming.graph import (
    ChannelGraph,
    flat_values,
    is_tensor_node,
    op_name,
    shape_of,
)
from slimship.slimming.ops.record import functional_name, register_op

#: elementwise ops (their in-place variants, `aten.relu_`, read these records)
UNARY = (
    "aten.relu aten.relu6 aten.gelu aten.silu aten.hardswish aten.hardsigmoid aten.sigmoid aten.tanh "
    "aten.hardtanh aten.clamp aten.clamp_min aten.clamp_max aten.leaky_relu aten.elu aten.mish "
    "aten.softplus aten.erf aten.exp aten.neg aten.abs aten.sqrt aten.rsqrt aten.reciprocal aten.square "
    "aten.log aten.pow aten.dropout aten.feature_dropout aten.alpha_dropout aten.clone aten.contiguous "
    "aten.alias aten.detach aten.to aten._to_copy aten.type_as aten.zeros_like aten.ones_like "
    "aten.full_like aten.empty_like aten.lift_fresh_copy"
).split()
BINARY = (
    "aten.add aten.sub aten.rsub aten.mul aten.div aten.maximum aten.minimum aten.where aten.masked_fill "
    "aten.eq aten.ne aten.gt aten.lt aten.ge aten.le aten.bitwise_and aten.bitwise_or aten.logical_and "
    "aten.logical_or aten.logical_not aten.bitwise_not aten.__and__ aten.__or__ aten.__xor__ "
).split()


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


def pointwise_values(va: FactStore, node: Node, a: dict[str, Any]) -> Facts:
    """Evaluate the op itself on per-slice constants; equality is the tuple of operand labels."""
    out_shape = shape_of(node)
    rank = len(out_shape)
    result: Facts = []
    for d in range(rank):
        if not va.live(node, d):
            result.append(None)
            continue
        n = out_shape[d]
        keys, subst = [], {}
        for name, value in a.items():
            if not is_tensor_node(value):
                continue
            t_shape = shape_of(value)
            td = d - (rank - len(t_shape))
            if td < 0 or t_shape[td] == 1:
                subst[name] = torch.full((n,), float("nan"), dtype=torch.float64)
                continue
            facts = va.dim_or_unknown(value, td, n)
            keys.append(facts.cls)
            subst[name] = torch.from_numpy(facts.const.copy())
        const = _evaluate(node, a, subst, n)
        name = op_name(node)
        if functional_name(name) == "aten.mul":
            for value in subst.values():
                const[value.numpy() == 0] = 0.0
        key = np.stack(keys, axis=1) if keys else np.zeros((n, 1), dtype=np.int64)
        result.append(DimFacts(const, relabel(key, const)))
    return result


def _evaluate(node: Node, a: dict[str, Any], subst: dict[str, torch.Tensor], n: int) -> np.ndarray:
    kwargs = {k: subst.get(k, v) for k, v in a.items()}
    try:
        schema = node.target._schema
        args = [kwargs[arg.name] for arg in schema.arguments if not arg.kwarg_only]
        kw = {arg.name: kwargs[arg.name] for arg in schema.arguments if arg.kwarg_only}
        for k in ("dtype", "device", "layout", "memory_format", "pin_memory", "non_blocking", "copy"):
            kw.pop(k, None)
        out = node.target(*args, **kw)
        out = out.double().reshape(-1)
        return out.numpy().copy() if out.numel() == n else np.full(n, np.nan)
    except Exception:
        return np.full(n, np.nan)


for _name in (*UNARY, *BINARY):
    register_op(_name, coupling=pointwise, values=pointwise_values)
