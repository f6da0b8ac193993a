"""One record per op: how it couples channels, what it proves about values, which sizes it holds.

`OPS` maps an op name (`aten.conv2d`, `mylib.my_op`, `getitem`) to its `OpRecord`. In-place
(`aten.relu_`) and `.out` variants are read through their functional op's record (`record_for`); an
op without a record pins every dimension it touches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.errors import SlimmingError
from slimship.slimming.facts import FactStore
from slimship.slimming.graph import ChannelGraph, OpArgs

#: sets `g.layouts[node]`, unifies what must go together, pins what must stay, registers sites
CouplingRule = Callable[[ChannelGraph, Node, OpArgs], None]
#: returns the node's facts (one `DimFacts | None` per dim, a list of those per output, or None)
ValueRule = Callable[[FactStore, Node, OpArgs], Any]
#: given which components stay (`keep`, per component of `g`), rewrites the sizes the node holds
SizeRule = Callable[[ChannelGraph, np.ndarray, Node, OpArgs], None]


@dataclass(frozen=True)
class OpRecord:
    """Everything slimming knows about one op.

    `coupling` is required. `values` is None when the op proves nothing about its result's values.
    `sizes` rewrites the sizes the op holds in its arguments (a `view` shape, a `split` size); an op
    whose arguments hold sizes that never change states why in `fixed_sizes` instead.
    """

    name: str
    coupling: CouplingRule
    values: ValueRule | None = None
    sizes: SizeRule | None = None
    fixed_sizes: str = ""


OPS: dict[str, OpRecord] = {}


def op_key(op: str | torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> str:
    """The registry name of an op given by name or as `torch.ops.ns.name[.overload]`."""
    if isinstance(op, str):
        return op
    if isinstance(op, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        schema = (
            op._schema if isinstance(op, torch._ops.OpOverload) else getattr(op, op.overloads()[0])._schema
        )
        return schema.name.replace("::", ".")
    raise SlimmingError(f"register_op: expected an op name or a torch.ops op, got {type(op).__name__}")


def register_op(
    ops: str | Any | Iterable[str | Any],
    coupling: CouplingRule | None = None,
    values: ValueRule | None = None,
    sizes: SizeRule | None = None,
    *,
    fixed_sizes: str = "",
    like: str | None = None,
    replace: bool = False,
) -> list[OpRecord]:
    """Register the record of one or more ops (by name, or `torch.ops.mylib.my_op`); returns them.

    `like="aten.relu"` takes the rules of an existing record (an elementwise custom op); rules given
    alongside override it. An op that has a record already is refused unless `replace=True`.
    """
    names = [op_key(op) for op in (ops if isinstance(ops, list | tuple) else [ops])]
    if like is not None:
        base = record_for(like)
        if base is None:
            raise SlimmingError(f"register_op: like={like!r} has no record")
        coupling = coupling or base.coupling
        values = values if values is not None else base.values
        sizes = sizes if sizes is not None else base.sizes
        fixed_sizes = fixed_sizes or base.fixed_sizes
    if not callable(coupling):
        raise SlimmingError(f"register_op {names}: a coupling rule (callable) is required")
    for rule, what in ((values, "values"), (sizes, "sizes")):
        if rule is not None and not callable(rule):
            raise SlimmingError(f"register_op {names}: {what} must be callable or None")
    taken = [name for name in names if name in OPS]
    if taken and not replace:
        raise SlimmingError(f"register_op: {taken} have a record already (pass replace=True to override)")
    records = [OpRecord(name, coupling, values, sizes, fixed_sizes) for name in names]
    for record in records:
        OPS[record.name] = record
    return records


def functional_name(name: str) -> str:
    """`aten.relu_` -> `aten.relu` (an in-place op's functional name); other names unchanged."""
    if name.endswith("_") and not name.endswith("__"):
        return name[:-1]
    return name


def record_for(name: str) -> OpRecord | None:
    """The record of an op name; an in-place variant reads its functional op's record."""
    record = OPS.get(name)
    if record is None and functional_name(name) != name:
        record = OPS.get(functional_name(name))
    return record


def written_args(node: Node) -> list[str]:
    """The arguments an in-place or `.out` call writes into (their value becomes the node's value)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    return [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
