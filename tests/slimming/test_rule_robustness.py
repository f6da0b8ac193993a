"""Every rule meets calls it was not written for: other overloads, arguments by position or by keyword,
an unknown keyword, a missing argument. Nothing may escape the engine; what a rule cannot read stays.

The calls are synthesised from each overload's schema (tensors of shape SHAPE, small ints), so many
are not even valid calls; a valid one (it runs on meta tensors) must read the same whether its
arguments come by position or by keyword.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import fx, nn

from slimship.slimming.graph import iter_dims, node_inputs, op_name
from slimship.slimming.ops import OPS as RECORDS
from slimship.slimming.plan import make_plan
from slimship.slimming.rewrite import rewrite
from slimship.slimming.rules import build_channel_graph
from slimship.slimming.values import ValueAnalysis

SHAPE = (2, 4, 6, 6)
#: every op with a record, and the in-place variants that read those records (`aten.relu_`)
OPS = sorted(
    {name for name in RECORDS if name.startswith("aten.")}
    | {name + "_" for name in RECORDS if name.startswith("aten.") and hasattr(torch.ops.aten, name[5:] + "_")}
)


def _overloads(name: str) -> list[torch._ops.OpOverload]:
    packet = getattr(torch.ops.aten, name.removeprefix("aten."), None)
    if packet is None:
        return []
    found = [getattr(packet, o) for o in packet.overloads()]
    return [o for o in found if not any(a.is_out for a in o._schema.arguments)][:6]


CASES = [(name, overload) for name in OPS for overload in _overloads(name)]


def _value_for(arg: Any, tensors: list[torch.Tensor]) -> Any:
    """A plausible value for a schema argument (tensors are appended to `tensors`)."""
    kind = str(arg.type)
    if kind.startswith("Tensor[]") or kind.startswith("List[Tensor]"):
        tensors.extend([torch.rand(SHAPE) + 0.5, torch.rand(SHAPE) + 0.5])
        return [len(tensors) - 2, len(tensors) - 1]
    if kind.startswith("Tensor"):
        tensors.append(torch.rand(SHAPE) + 0.5)
        return len(tensors) - 1
    if arg.has_default_value():
        return arg.default_value
    table = {"int": 1, "SymInt": 1, "float": 1.0, "bool": False, "Scalar": 2, "str": "none", "Dimname": "C"}
    for prefix, value in table.items():
        if kind.startswith(prefix + "[]") or kind.startswith(f"List[{prefix}]"):
            return [value]
        if kind.startswith(prefix):
            return value
    return None


def _graph(overload, variant: str) -> tuple[fx.GraphModule, fx.Node] | None:
    schema = overload._schema
    tensors: list[torch.Tensor] = []
    values = {a.name: _value_for(a, tensors) for a in schema.arguments}
    root = nn.Module()
    graph = fx.Graph()
    nodes = []
    for i, t in enumerate(tensors):
        t[:, 0] = 0 if t.dim() > 1 else t[0]  # a zero channel for the value rules to find
        root.register_parameter(f"p{i}", nn.Parameter(t, requires_grad=False))
        node = graph.get_attr(f"p{i}")
        node.meta["val"] = t
        nodes.append(node)

    def as_arg(a, v):
        kind = str(a.type)
        if kind.startswith("Tensor[]") or kind.startswith("List[Tensor]"):
            return [nodes[j] for j in v]
        return nodes[v] if kind.startswith("Tensor") and v is not None else v

    positional = [a for a in schema.arguments if not a.kwarg_only]
    kw_only = {a.name: as_arg(a, values[a.name]) for a in schema.arguments if a.kwarg_only}
    args = [as_arg(a, values[a.name]) for a in positional]
    kwargs = dict(kw_only)
    if variant == "keyword" and len(args) > 1:
        kwargs.update({a.name: v for a, v in zip(positional[1:], args[1:], strict=True)})
        args = args[:1]
    elif variant == "extra_kwarg":
        kwargs["unexpected"] = 1
    elif variant == "missing":
        required = [i for i, a in enumerate(positional) if not a.has_default_value()]
        if len(required) < 2:
            return None
        args = args[: required[-1]]
    call = graph.call_function(overload, tuple(args), kwargs)
    call.meta["val"] = _meta_value(overload, values, schema, tensors)
    graph.output(None)
    return fx.GraphModule(root, graph), call


def _meta_value(overload, values, schema, tensors) -> Any:
    """The call's result on meta tensors; for a call that does not run, a tensor of SHAPE."""
    metas = [t.to("meta") for t in tensors]

    def meta(a, v):
        kind = str(a.type)
        if kind.startswith("Tensor[]") or kind.startswith("List[Tensor]"):
            return [metas[j] for j in v]
        return metas[v] if kind.startswith("Tensor") and v is not None else v

    args = [meta(a, values[a.name]) for a in schema.arguments if not a.kwarg_only]
    kwargs = {a.name: meta(a, values[a.name]) for a in schema.arguments if a.kwarg_only}
    try:
        return overload(*args, **kwargs)
    except Exception:
        return torch.empty(SHAPE, device="meta")


def _run_engine(gm: fx.GraphModule):
    g = build_channel_graph(gm)
    va = ValueAnalysis(g)
    plan = make_plan(g, va)
    rewrite(g, plan)
    return g


def _assert_unreadable_pinned(g, call: fx.Node) -> None:
    if any(u.node == call.name for u in g.unreadable):
        for value in node_inputs(call):
            for ids in iter_dims(g.layout(value)):
                assert g.pinned[g.comps(ids)].all(), f"{call.name}: an unreadable node's input stays free"


@pytest.mark.parametrize(("name", "overload"), CASES, ids=[str(o) for _, o in CASES])
def test_rule_reads_or_pins_every_call_form(name: str, overload) -> None:
    graphs = {}
    for variant in ("positional", "keyword", "extra_kwarg", "missing"):
        built = _graph(overload, variant)
        if built is None:
            continue
        gm, call = built
        assert op_name(call) == name
        g = _run_engine(gm)  # nothing escapes
        _assert_unreadable_pinned(g, call)
        if variant in ("extra_kwarg", "missing"):
            assert any(u.node == call.name and u.stage == "coupling" for u in g.unreadable), variant
        graphs[variant] = g
    # the same call by position or by keyword reads the same
    a, b = graphs["positional"], graphs.get("keyword", graphs["positional"])
    assert [(u.node, u.stage) for u in a.unreadable] == [(u.node, u.stage) for u in b.unreadable]
    assert np.array_equal(_canonical(a.component), _canonical(b.component))
    assert np.array_equal(a.pinned[a.component], b.pinned[b.component])


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Component labels renumbered by first appearance (equal partitions, equal arrays)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse]
