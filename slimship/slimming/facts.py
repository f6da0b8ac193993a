"""Value facts: what is provable about each slice of each tracked dimension, and the queries rules ask.

For a tensor dim, `DimFacts.const[p]` is the value every element of slice p provably has (NaN when
unknown; 0.0 is a zero-invariant channel), and `DimFacts.cls[p]` labels slices that are provably
equal (identical filters). `FactStore` holds the facts found so far and reads parameters; the value
rules of the op records (`slimship.slimming.ops`) fill it, run by `values.ValueAnalysis`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.graph import ChannelGraph, get_tensor

_labels = itertools.count(1 << 40)


@dataclass
class DimFacts:
    const: np.ndarray  # float64, NaN = unknown
    cls: np.ndarray  # int64 equality labels

    @classmethod
    def unknown(cls, n: int) -> DimFacts:
        start = next(_labels)
        for _ in range(n):
            next(_labels)
        return cls(np.full(n, np.nan), np.arange(start, start + n, dtype=np.int64))

    def take(self, index: np.ndarray | slice) -> DimFacts:
        return DimFacts(self.const[index], self.cls[index])


Facts = list[DimFacts | None]


def reserve(n: int) -> int:
    """Take a fresh block of labels [start, start + n] from the global counter; return start."""
    start = next(_labels)
    if n > 0:
        next(itertools.islice(_labels, n - 1, n))
    return start


def row_inverse(
    keys: np.ndarray, cols: np.ndarray | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """Index of each row among the distinct rows of a 2-D array (equal rows, equal index, < len).

    Only rows `rows` and columns `cols` are compared (all by default). The same partition as
    `np.unique(keys[rows][:, cols], axis=0)` (float equality: -0.0 == 0.0), found faster: rows
    are grouped by the bytes of a few sampled columns and only rows that share a sample are
    compared in full. Keys with NaN (NaN != NaN) or no columns take `np.unique(axis=0)` itself.
    """
    rows = np.arange(keys.shape[0]) if rows is None else rows
    n, m = len(rows), keys.shape[1] if cols is None else len(cols)
    if not m or not n or (keys.dtype.kind == "f" and np.isnan(keys).any()):
        chosen = keys[rows] if cols is None else keys[np.ix_(rows, cols)]
        return np.unique(chosen, axis=0, return_inverse=True)[1].reshape(-1)
    if m == 1:  # one column: a plain 1-D unique (float equality too)
        column = keys[rows, 0 if cols is None else cols[0]]
        return np.unique(column, return_inverse=True)[1].reshape(-1)
    picked = np.unique(np.linspace(0, m - 1, num=16).astype(np.int64)) if m > 16 else np.arange(m)
    sample = keys[np.ix_(rows, picked if cols is None else cols[picked])]
    _, first, inverse = np.unique(_void_rows(sample), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(first) == n or len(picked) == m:
        return inverse
    shared = np.flatnonzero(np.bincount(inverse)[inverse] > 1)
    a, b = keys[rows[shared]], keys[rows[first[inverse[shared]]]]
    if cols is not None:
        a, b = a[:, cols], b[:, cols]
    if (a == b).all():
        return inverse
    full = np.unique(_void_rows(a), return_inverse=True)[1].reshape(-1)
    inverse[shared] = len(first) + full  # equal in full implies equal in the sample
    return np.unique(inverse, return_inverse=True)[1].reshape(-1)


def _void_rows(keys: np.ndarray) -> np.ndarray:
    """Each row of a NaN-free 2-D array as one opaque item: equal items are equal rows."""
    if keys.dtype.kind == "f":
        keys = keys + 0.0  # -0.0 -> 0.0: equal as floats, so equal as bytes
    keys = np.ascontiguousarray(keys)
    return keys.view(np.dtype((np.void, keys.dtype.itemsize * keys.shape[1]))).reshape(-1)


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy, without a copy where numpy has the dtype (else widened exactly)."""
    tensor = tensor.detach()
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks: float32 holds them exactly (half of float64)
        return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.double().numpy()


def relabel(keys: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Equality labels from key rows; slices with the same known constant are equal too."""
    keys = keys.reshape(len(keys), -1)
    labels = row_inverse(keys).astype(np.int64) + reserve(len(keys))
    known = ~np.isnan(const)
    if known.any():
        _, first = np.unique(const[known], return_inverse=True)
        labels[known] = first.reshape(-1) + reserve(int(known.sum()))
    return labels


def slice_consts(values: np.ndarray, d: int) -> np.ndarray:
    """Per slice along d: its value if every element is equal, else NaN (min/max in the array's own
    dtype, exact in any order, widened afterwards)."""
    n = values.shape[d]
    pre, post = int(np.prod(values.shape[:d])), int(np.prod(values.shape[d + 1 :]))
    if pre * post == 0:
        return np.zeros(n)
    blocks = values.reshape(pre, n, post)
    lo = blocks.min(axis=0).min(axis=1).astype(np.float64)
    hi = blocks.max(axis=0).max(axis=1).astype(np.float64)
    return np.where(lo == hi, lo, np.nan)


def slice_labels(tensor: torch.Tensor, d: int) -> np.ndarray:
    """Fresh labels of the slices along d: equal slices, equal labels (see `_equal_slices`)."""
    inverse = _equal_slices(tensor, d)
    return inverse.astype(np.int64) + reserve(len(inverse))


def facts_of(tensor: torch.Tensor, d: int) -> DimFacts:
    """Facts of dim d of a known tensor (a value computed from parameters only)."""
    tensor = tensor.detach()
    return DimFacts(slice_consts(as_numpy(tensor), d), slice_labels(tensor, d))


class FactStore:
    """The facts of a graph's values, by node, and its parameters read once (rules query this)."""

    def __init__(self, g: ChannelGraph) -> None:
        self.g = g
        self.gm = g.gm
        self.facts: dict[Node, Any] = {}
        self._param_cache: dict[tuple[Node, int], DimFacts] = {}
        self._const_cache: dict[tuple[Node, int], np.ndarray] = {}
        self._tensors: dict[Any, torch.Tensor] = {}  # the graph's parameters and buffers, by target

    def has_param(self, value: Any) -> bool:
        """True if `value` is a parameter, buffer or constant of the graph (not computed in forward)."""
        return isinstance(value, Node) and value.op == "get_attr"

    def vector(self, value: Any, n: int) -> np.ndarray:
        """A 1-D operand's values in float64 (a parameter's own, or its proven constants; NaN unknown)."""
        if self.has_param(value):
            return self.param(value).detach().double().numpy().reshape(-1)
        const = self.const(value, 0)
        return const if const is not None and len(const) == n else np.full(n, np.nan)

    # ---- queries -----------------------------------------------------------------------------
    def live(self, node: Node, d: int) -> bool:
        layout = self.g.layouts.get(node)
        if layout is None or d >= len(layout) or not isinstance(layout[d], np.ndarray):
            return False
        ids = layout[d]
        return bool(len(ids)) and not bool(self.g.pinned[self.g.comps(ids)].all())

    def param(self, node: Node) -> torch.Tensor:
        if not self.has_param(node):
            raise TypeError(f"{getattr(node, 'name', node)} is computed in forward, not a parameter")
        target = node.target
        if target not in self._tensors:
            is_param = _is_param(self.gm, node)
            self._tensors[target] = self.gm.get_parameter(target) if is_param else get_tensor(self.gm, target)
        return self._tensors[target]

    def dim(self, value: Any, d: int) -> DimFacts | None:
        """Facts of dim d of a value (activation or parameter)."""
        if not isinstance(value, Node):
            return None
        if value.op == "get_attr":
            return self.param_facts(value, d)
        facts = self.facts.get(value)
        if facts is None or d >= len(facts):
            return None
        return facts[d]

    def dim_or_unknown(self, value: Any, d: int, n: int) -> DimFacts:
        facts = self.dim(value, d)
        return facts if facts is not None else DimFacts.unknown(n)

    def const(self, value: Any, d: int) -> np.ndarray | None:
        """Only the constants of dim d of a value (for parameters, cheaper than `dim`)."""
        if isinstance(value, Node) and value.op == "get_attr":
            return self.param_const(value, d)
        facts = self.dim(value, d)
        return facts.const if facts is not None else None

    def param_const(self, node: Node, d: int) -> np.ndarray:
        """Per slice along d of a parameter: its value if every element is equal, else NaN."""
        key = (node, d)
        if key not in self._const_cache:
            self._const_cache[key] = slice_consts(as_numpy(self.param(node)), d)
        return self._const_cache[key]

    def param_facts(self, node: Node, d: int) -> DimFacts:
        key = (node, d)
        if key not in self._param_cache:
            const = self.param_const(node, d)
            self._param_cache[key] = DimFacts(const, slice_labels(self.param(node).detach(), d))
        return self._param_cache[key]


def _equal_slices(tensor: torch.Tensor, d: int) -> np.ndarray:
    """Index of each slice along d among the distinct slices (float equality), read in the tensor's own
    dtype (bfloat16 widened to float32, exactly), so no float64 copy of a large weight is made."""
    rows = tensor.movedim(d, 0).reshape(tensor.shape[d], -1)
    if rows.is_floating_point():
        return row_inverse(as_numpy(rows))  # NaN (equal to nothing) is handled there
    return torch.unique(rows.double(), dim=0, return_inverse=True)[1].numpy()


def _is_param(gm: torch.fx.GraphModule, node: Node) -> bool:
    try:
        gm.get_parameter(node.target)
        return True
    except AttributeError:
        return False
