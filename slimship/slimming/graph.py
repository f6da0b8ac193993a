"""The channel graph: every position of every tracked tensor dimension gets an id; ops couple ids.

A *layout* is, per tensor dimension, an array of position ids (or None for an untracked dimension,
such as a dynamic batch). Op records (see `ops/`) unify ids that must be removed together, pin ids
that must stay, and register *sites*: the places where values along a dimension are mixed (a
convolution's input channels, a matmul's inner dimension), which is where value analysis must
prove a removal exact. Connected components of the unified ids are the removable channels.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
from torch.fx import Node

Layout = list[np.ndarray | None]

# Site kinds: how a consumer mixes values along a dimension, and so which proofs can remove or merge there.
LINEAR = "linear"  # y = x @ W.T: zero removable, constants foldable into the bias, equal columns mergeable
CONV = "conv"  # like LINEAR, over kernels; folding needs zero padding
CONV_T = "conv_transpose"  # transposed convolution: like CONV, its weight's dim 0 is the input side
DOT = "dot"  # product of two activations summed over the dimension: a zero in either operand removes it
SUM = "sum"  # plain sum over the dimension: zeros removable

MERGEABLE_SITES = {LINEAR, CONV, CONV_T}


@dataclass
class Site:
    """A consumer that mixes values along one dimension of its operands (aligned positions)."""

    node: Node
    kind: str
    operands: list[tuple[Node, int]]  # (tensor node, dim): position j of each operand is the same channel
    weight: Node | None = None  # the consumer's weight parameter (get_attr) for LINEAR/CONV sites
    weight_dim: int = 1
    bias: Node | None = None
    foldable: bool = False  # constants along this dim can be folded into `bias` exactly


@dataclass
class Unreadable:
    """A node whose rule could not read it (coupling, values or rewrite stage): its dims stay."""

    node: str
    op: str
    stage: str
    reason: str


@dataclass
class ChannelGraph:
    gm: torch.fx.GraphModule
    count: int = 0
    layouts: dict[Node, Any] = field(default_factory=dict)
    _edges: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _pins: list[tuple[np.ndarray, str]] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    consumer_dims: set[tuple[Node, int]] = field(default_factory=set)  # param dims read by a site
    stat_dims: set[tuple[Node, int]] = field(default_factory=set)  # variance-like buffers: never zeroed
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # op -> nodes pinned for lack of a rule
    unreadable: list[Unreadable] = field(default_factory=list)  # nodes a rule could not read: pinned
    component: np.ndarray | None = None
    pinned: np.ndarray | None = None  # per component
    pin_reason: dict[int, str] = field(default_factory=dict)  # component -> first reason

    # ---- building ------------------------------------------------------------------------------
    def fresh(self, size: int | None, pin: str | None = None) -> np.ndarray | None:
        if size is None:
            return None
        ids = np.arange(self.count, self.count + size, dtype=np.int64)
        self.count += size
        if pin is not None:
            self._pins.append((ids, pin))
        return ids

    def fresh_layout(self, node: Node, pin: str | None = None) -> Layout:
        return [self.fresh(s, pin) for s in shape_of(node)]

    def unify(self, a: np.ndarray | None, b: np.ndarray | None, reason: str = "dynamic dimension") -> None:
        if a is None and b is None:
            return
        if a is None or b is None:
            self.pin(a if a is not None else b, reason)
            return
        if len(a) != len(b):
            self.pin(a, f"size mismatch ({reason})")
            self.pin(b, f"size mismatch ({reason})")
            return
        self._edges.append((a, b))

    def pin(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is not None and len(ids):
            self._pins.append((ids, reason))

    def pin_layout(self, layout: Any, reason: str) -> None:
        for ids in iter_dims(layout):
            self.pin(ids, reason)

    def record_unreadable(self, node: Node, stage: str, exc: BaseException) -> str:
        """Note that the `stage` rule of `node` failed; return the pin reason naming node, op and cause."""
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        self.unreadable.append(Unreadable(node.name, op_name(node), stage, cause))
        return f"{stage} rule could not read {op_name(node)} (node {node.name}): {cause}"

    def layout(self, value: Any) -> Any:
        """Layout of a graph value (Node); None for scalars and non-tensors."""
        if isinstance(value, Node):
            return self.layouts.get(value)
        return None

    # ---- solving -------------------------------------------------------------------------------
    def solve(self) -> None:
        """Connected components of unified ids; a component is pinned if any of its ids is."""
        n = self.count
        if self._edges:
            rows = np.concatenate([a for a, _ in self._edges])
            cols = np.concatenate([b for _, b in self._edges])
        else:
            rows = cols = np.zeros(0, dtype=np.int64)
        matrix = scipy.sparse.coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
        _, labels = scipy.sparse.csgraph.connected_components(matrix, directed=False)
        self.component = labels.astype(np.int64)
        ncomp = int(labels.max()) + 1 if n else 0
        self.pinned = np.zeros(ncomp, dtype=bool)
        if not self._pins:
            return
        # a pinned component's reason is that of the first pin touching it
        pin_comps = labels[np.concatenate([ids for ids, _ in self._pins])]
        pin_index = np.repeat(np.arange(len(self._pins)), [len(ids) for ids, _ in self._pins])
        comps, first = np.unique(pin_comps, return_index=True)
        self.pinned[comps] = True
        for k in np.lexsort((comps, pin_index[first])):
            self.pin_reason[int(comps[k])] = self._pins[pin_index[first[k]]][1]

    def comps(self, ids: np.ndarray) -> np.ndarray:
        assert self.component is not None
        return self.component[ids]


def unique_ints(values: np.ndarray) -> np.ndarray:
    """`np.unique` of an integer array (sorted distinct values), by sorting: several times faster
    here than numpy's hash-based path for the small id arrays of a channel graph."""
    ordered = np.sort(values)
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])] if len(ordered) else ordered


def iter_dims(layout: Any):
    """Yield every tracked id array of a layout or a tuple of layouts."""
    if layout is None:
        return
    if isinstance(layout, np.ndarray):
        yield layout
        return
    for item in layout:
        yield from iter_dims(item)


def is_multi(layout: Any) -> bool:
    """True for the layout of a multi-output node (a list of layouts)."""
    return isinstance(layout, list) and any(isinstance(x, list) for x in layout)


def shape_of(node: Node) -> list[int | None]:
    """Concrete sizes of a tensor node's dims; None for symbolic ones."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    return [int(s) if isinstance(s, int) else None for s in val.shape]


def is_tensor_node(value: Any) -> bool:
    return isinstance(value, Node) and isinstance(value.meta.get("val"), torch.Tensor)


def get_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The parameter, buffer or constant tensor at a qualified name such as 'layer1.0.conv1.weight'."""
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return getattr(owner, leaf)


def slice_index(dim: int, positions: Sequence[int], ndim: int) -> tuple[Any, ...]:
    """An index selecting `positions` along `dim` of an `ndim`-dimensional tensor."""
    index: list[Any] = [slice(None)] * ndim
    index[dim] = torch.as_tensor(list(positions), dtype=torch.long)
    return tuple(index)


def registrar(table: dict[str, Any]) -> Any:
    """A decorator factory filling `table`: `@rule("aten.relu", "aten.gelu")` registers one function twice."""

    def decorator(*names: str) -> Any:
        def register(fn: Any) -> Any:
            for name in names:
                table[name] = fn
            return fn

        return register

    return decorator


def op_name(node: Node) -> str:
    """'aten.conv2d' style name for a call_function node ('mylib.my_op' for a custom op)."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.replace("::", ".")
    return getattr(target, "__name__", str(target))


# Argument names that overloads of one op spell differently; a rule reads the name on the left.
ARG_ALIASES = {
    "self": ("input", "a"),
    "input": ("self", "a"),
    "dim0": ("axis0",),
    "dim1": ("axis1",),
    "dim": ("axis",),
    "other": ("mat2",),
    "mat2": ("other",),
}


class OpArgs(dict):
    """An ATen call's arguments by schema name (defaults filled in), also by alias and by position.

    `a["dim0"]` finds `axis0` too (see ARG_ALIASES); `a.at(1)` is the second schema argument, however
    it was passed. A missing name raises a KeyError naming the node and the names it has.
    """

    def __init__(self, node: Node, values: dict[str, Any], positional: list[Any]) -> None:
        super().__init__(values)
        self.node_name = node.name
        self.positional = positional

    def __missing__(self, key: str) -> Any:
        for alias in ARG_ALIASES.get(key, ()):
            if dict.__contains__(self, alias):
                return dict.__getitem__(self, alias)
        raise KeyError(f"{self.node_name} has no argument {key!r} (has {sorted(self)})")

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or any(
            dict.__contains__(self, a) for a in ARG_ALIASES.get(key, ())
        )

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - dict.get skips the aliases

    def at(self, index: int) -> Any:
        return self.positional[index]


def op_args(node: Node) -> OpArgs:
    """Normalise a call's args and kwargs against its schema: every argument by name, defaults filled.

    Raises ValueError for a call its schema cannot read (an unknown keyword, a required argument
    missing, too many positional arguments): the caller pins the node. A target without a schema
    (getitem, a Python function) keeps its positional arguments and its keywords by name.
    """
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return OpArgs(node, dict(node.kwargs), list(node.args))
    schema_args = target._schema.arguments
    if len(node.args) > len(schema_args):
        raise ValueError(f"{node.name}: {len(node.args)} positional arguments for {target._schema}")
    unknown = set(node.kwargs) - {arg.name for arg in schema_args}
    if unknown:
        raise ValueError(f"{node.name}: unknown keyword(s) {sorted(unknown)} for {target._schema}")
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema_args):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        elif str(arg.type).endswith("?"):  # optional without a default: absent is None
            out[arg.name] = None
        else:
            raise ValueError(f"{node.name}: required argument {arg.name!r} missing for {target._schema}")
    return OpArgs(node, out, [out[arg.name] for arg in schema_args])


def flat_values(value: Any) -> list[Any]:
    """Every leaf of nested lists, tuples and dicts."""
    if isinstance(value, list | tuple):
        return [x for item in value for x in flat_values(item)]
    if isinstance(value, dict):
        return [x for item in value.values() for x in flat_values(item)]
    return [value]


def node_inputs(node: Node) -> list[Any]:
    """Every leaf of a node's args and kwargs."""
    return flat_values(node.args) + flat_values(node.kwargs)


def pin_touched(g: ChannelGraph, node: Node, reason: str) -> None:
    """Pin every dim of every tensor a node reads, and of its own layout if it has one."""
    for value in node_inputs(node):
        g.pin_layout(g.layout(value), reason)
    g.pin_layout(g.layouts.get(node), reason)


def set_op_arg(node: Node, name: str, value: Any) -> None:
    """Set an ATen call's argument by schema name (positional if it was given positionally)."""
    schema_args = node.target._schema.arguments
    names = [name, *ARG_ALIASES.get(name, ())]
    index = next(i for i, a in enumerate(schema_args) if a.name in names)
    name = schema_args[index].name
    if index < len(node.args):
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs
