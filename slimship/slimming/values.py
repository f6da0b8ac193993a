"""Value analysis: what is provable about each slice of each tracked dimension.

For a tensor dim, `DimFacts.const[p]` is the value every element of slice p provably has (NaN when
unknown; 0.0 is a zero-invariant channel), and `DimFacts.cls[p]` labels slices that are provably
equal (identical filters). Facts come from parameter values and flow through one small rule per op;
an op without a rule proves nothing. Only dims in removable components are analysed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.fx import Node

from slimship.slimming.graph import (
    ChannelGraph,
    get_tensor,
    is_tensor_node,
    op_args,
    op_name,
    pin_touched,
    registrar,
    shape_of,
    unique_ints,
)
from slimship.slimming.rules import BINARY, RESHAPES, UNARY, addmm_weight, as_int, reshape_blocks, sym_sizes

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


def _reserve(n: int) -> int:
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


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy, without a copy where numpy has the dtype (else widened exactly)."""
    tensor = tensor.detach()
    try:
        return tensor.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks: float32 holds them exactly (half of float64)
        return tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.double().numpy()


def relabel(keys: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Equality labels from key rows; slices with the same known constant are equal too."""
    keys = keys.reshape(len(keys), -1)
    labels = row_inverse(keys).astype(np.int64) + _reserve(len(keys))
    known = ~np.isnan(const)
    if known.any():
        _, first = np.unique(const[known], return_inverse=True)
        labels[known] = first.reshape(-1) + _reserve(int(known.sum()))
    return labels


class ValueAnalysis:
    """Runs the value rules over the graph, given the solved channel graph."""

    def __init__(self, g: ChannelGraph) -> None:
        self.g = g
        self.gm = g.gm
        self.facts: dict[Node, Any] = {}
        self._param_cache: dict[tuple[Node, int], DimFacts] = {}
        self._const_cache: dict[tuple[Node, int], np.ndarray] = {}
        self._tensors: dict[Any, torch.Tensor] = {}  # the graph's parameters and buffers, by target
        failed = False
        for node in self.gm.graph.nodes:
            if node.op == "call_function":
                self.facts[node] = None
                fn = VALUE_RULES.get(op_name(node))
                if fn is None:
                    continue
                try:
                    self.facts[node] = fn(self, node, op_args(node))
                except Exception as exc:  # a rule that cannot read its node proves nothing and pins it
                    pin_touched(g, node, g.record_unreadable(node, "values", exc))
                    failed = True
        if failed:
            g.solve()  # pinning only shrinks what is live: facts found so far stay true

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
            values = _as_numpy(self.param(node))
            n = values.shape[d]
            pre, post = int(np.prod(values.shape[:d])), int(np.prod(values.shape[d + 1 :]))
            if pre * post == 0:
                const = np.zeros(n)
            else:  # min/max in the parameter's own dtype (exact, in any order), widened afterwards
                blocks = values.reshape(pre, n, post)
                lo = blocks.min(axis=0).min(axis=1).astype(np.float64)
                hi = blocks.max(axis=0).max(axis=1).astype(np.float64)
                const = np.where(lo == hi, lo, np.nan)
            self._const_cache[key] = const
        return self._const_cache[key]

    def param_facts(self, node: Node, d: int) -> DimFacts:
        key = (node, d)
        if key not in self._param_cache:
            const = self.param_const(node, d)
            inverse = _equal_slices(self.param(node).detach(), d)
            start = _reserve(len(inverse))
            self._param_cache[key] = DimFacts(const, inverse.astype(np.int64) + start)
        return self._param_cache[key]


def _equal_slices(tensor: torch.Tensor, d: int) -> np.ndarray:
    """Index of each slice along d among the distinct slices (float equality), read in the tensor's own
    dtype (bfloat16 widened to float32, exactly), so no float64 copy of a large weight is made."""
    rows = tensor.movedim(d, 0).reshape(tensor.shape[d], -1)
    if rows.is_floating_point():
        return row_inverse(_as_numpy(rows))  # NaN (equal to nothing) is handled there
    return torch.unique(rows.double(), dim=0, return_inverse=True)[1].numpy()


def _is_param(gm: torch.fx.GraphModule, node: Node) -> bool:
    try:
        gm.get_parameter(node.target)
        return True
    except AttributeError:
        return False


ValueRule = Callable[[ValueAnalysis, Node, dict[str, Any]], Any]
VALUE_RULES: dict[str, ValueRule] = {}


value_rule = registrar(VALUE_RULES)


def _rank(node: Node) -> int:
    return len(shape_of(node))


def _none(node: Node) -> Facts:
    return [None] * _rank(node)


# ---- elementwise --------------------------------------------------------------------------------
def _flat_values(a: dict[str, Any]) -> list[Any]:
    out = []
    for v in a.values():
        out.extend(v if isinstance(v, list | tuple) else [v])
    return out


def pointwise(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
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
        if name in ("aten.mul", "aten.mul_"):
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


# The coupling table's elementwise ops share this value rule.
for _name in (*UNARY, *BINARY):
    VALUE_RULES[_name] = pointwise


# ---- layers ------------------------------------------------------------------------------------
@value_rule("aten.linear")
def linear(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x, w, b = a["input"], a["weight"], a.get("bias")
    rank = _rank(node)
    result = _none(node)
    out_ch = shape_of(node)[-1]
    bias = va.vector(b, out_ch) if b is not None else None
    for d in range(rank - 1):  # slices along leading dims: zero stays zero without a bias
        if va.live(node, d):
            facts = va.dim_or_unknown(x, d, shape_of(node)[d])
            zero_bias = bias is None or bool((bias == 0).all())
            const = np.where((facts.const == 0) & zero_bias, 0.0, np.nan)
            result[d] = DimFacts(const, relabel(facts.cls, const))
    if va.live(node, rank - 1):
        if va.has_param(w):
            facts = va.dim(x, len(shape_of(x)) - 1)
            result[rank - 1] = _mixing_out(va, va.param(w).detach(), bias, facts, exact_const=True)
        else:
            result[rank - 1] = _computed_weight_out(va, w, bias, out_ch)
    return result


@value_rule("aten.addmm")
def addmm(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    """Facts of beta * bias + alpha * (x @ W) for alpha = beta = 1 (a linear layer), else none."""

    x, mat2, b = a["mat1"], a["mat2"], a["self"]
    result = _none(node)
    if a.get("alpha", 1) != 1 or a.get("beta", 1) != 1 or not is_tensor_node(b) or len(shape_of(b)) != 1:
        return result
    n, out_ch = shape_of(node)
    bias = va.vector(b, out_ch) if shape_of(b)[0] == out_ch else np.full(out_ch, np.nan)
    if va.live(node, 0):
        facts = va.dim_or_unknown(x, 0, n)
        const = np.where((facts.const == 0) & bool((bias == 0).all()), 0.0, np.nan)
        result[0] = DimFacts(const, relabel(facts.cls, const))
    if va.live(node, 1):
        weight, weight_dim = addmm_weight(mat2)
        if weight is None:
            result[1] = _computed_weight_out(va, mat2, bias, out_ch, weight_dim=1)
        else:
            w = va.param(weight).detach()
            w = w.t() if weight_dim == 0 else w
            result[1] = _mixing_out(va, w, bias, va.dim(x, 1), exact_const=True)
    return result


def _bias_keys(bias: np.ndarray) -> list[np.ndarray]:
    """Key columns for a bias: equal known values are equal; each unknown value is its own."""
    unknown = np.isnan(bias)
    return [np.where(unknown, 0.0, bias), np.where(unknown, np.arange(1, len(bias) + 1), 0.0)]


def _computed_weight_out(
    va: ValueAnalysis, w: Node, bias: np.ndarray | None, out_ch: int, weight_dim: int = 0
) -> DimFacts:
    """Output-channel facts when the weight is computed in forward (weight standardisation, ...):
    a provably zero row gives its bias, provably equal rows with equal biases give equal channels.
    `weight_dim` is the weight's output dim."""
    facts = va.dim_or_unknown(w, weight_dim, out_ch)
    b = bias if bias is not None else np.zeros(out_ch)
    const = np.where(facts.const == 0, b, np.nan)
    keys = np.stack([facts.cls.astype(np.float64), *_bias_keys(b)], axis=1)
    return DimFacts(const, relabel(keys, const))


def _mixing_out(
    va: ValueAnalysis,
    weight: torch.Tensor,
    bias: np.ndarray | None,
    facts: DimFacts | None,
    exact_const: bool,
) -> DimFacts:
    """Output-channel facts of y_o = sum_i W[o, i] * x_i + b_o (weights may carry kernel dims).

    Zero and equality tests on the weight are exact in its own dtype and run in numpy (much
    faster than torch for these reductions); constant sums are taken in float64 over the rows
    that can be constant.
    """
    out_ch, in_ch = weight.shape[0], weight.shape[1]
    facts = facts if facts is not None else DimFacts.unknown(in_ch)
    w_np = _as_numpy(weight).reshape(out_ch, in_ch, -1)
    kernel = w_np.shape[2]
    w2 = w_np.reshape(out_ch, in_ch * kernel)
    zero_np = facts.const == 0
    live = ~zero_np  # zero inputs count as zero weights: their columns never matter
    empty = _EmptyRows(w2, kernel)
    b_np = bias if bias is not None else np.zeros(out_ch)
    b = torch.from_numpy(b_np)
    # a row is constant when it has no non-zero weight on an input it cannot treat as a constant
    const_ok = empty(np.isnan(facts.const) if exact_const else live)
    const = np.full(out_ch, np.nan)
    if exact_const:
        # an all-zero row is its bias (+ a zero sum); other constant rows sum their constant inputs
        blank = empty(np.ones(in_ch, dtype=bool))
        const[blank] = b_np[blank] + 0.0
        rows = torch.from_numpy(np.flatnonzero(const_ok & ~blank))
        if len(rows):
            c_in = torch.from_numpy(np.nan_to_num(facts.const))
            zero_in = torch.from_numpy(zero_np)
            w_rows = weight.reshape(out_ch, in_ch, -1).index_select(0, rows).double()
            w_rows = w_rows.masked_fill(zero_in[None, :, None], 0.0)
            const[rows.numpy()] = (b[rows] + (w_rows.sum(dim=2) * c_in[None, :]).sum(dim=1)).numpy()
    else:
        const[const_ok] = b_np[const_ok]
    # equal output channels: same effective weights over the live inputs after summing equal
    # input slices, and the same bias
    labels = np.unique(facts.cls[live], return_inverse=True)[1].reshape(-1)
    if len(unique_ints(labels)) == len(labels):  # no equal inputs: the sum would only permute columns
        blank = empty(live)  # rows with no weight on a live input: all equal
        cols = (
            None if live.all() else (np.flatnonzero(live)[:, None] * kernel + np.arange(kernel)).reshape(-1)
        )
        row_label = np.zeros(out_ch, dtype=np.int64)
        others = np.flatnonzero(~blank)
        row_label[others] = 1 + row_inverse(w2, cols, others)
    else:
        merged = torch.zeros(out_ch, int(labels.max()) + 1, kernel, dtype=torch.float64)
        merged.index_add_(1, torch.from_numpy(labels), torch.from_numpy(w_np[:, live]).double())
        row_label = row_inverse(merged.reshape(out_ch, merged.shape[1] * kernel).numpy())
    keys = np.stack([row_label.astype(np.float64), *_bias_keys(b_np)], axis=1)
    return DimFacts(const, relabel(keys, const))


class _EmptyRows:
    """Which rows of a weight (O, I*K) have no non-zero entry on a given set of inputs (exact:
    NaN counts as non-zero, as in a direct test)."""

    def __init__(self, w2: np.ndarray, kernel: int) -> None:
        self.kernel = kernel
        self.nonzero = w2 != 0
        self.nonzero_rows: np.ndarray | None = None

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        if inputs.all():
            if self.nonzero_rows is None:
                self.nonzero_rows = self.nonzero.any(axis=1)
            return ~self.nonzero_rows
        if not inputs.any():
            return np.ones(self.nonzero.shape[0], dtype=bool)
        return ~(self.nonzero & np.repeat(inputs, self.kernel)).any(axis=1)


@value_rule("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution")
def conv(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    result = _none(node)
    if not va.live(node, 1):
        return result
    x, w, b = a["input"], a["weight"], a.get("bias")
    out_ch = shape_of(node)[1]
    bias = va.vector(b, out_ch) if b is not None else None
    groups = int(a.get("groups") or 1)
    in_ch = shape_of(x)[1]
    padding = a.get("padding")
    zero_pad = padding in (None, "valid") or (not isinstance(padding, str) and not any(padding))
    if groups == 1 and va.has_param(w):
        result[1] = _mixing_out(va, va.param(w).detach(), bias, va.dim(x, 1), exact_const=zero_pad)
    elif groups == 1:
        result[1] = _computed_weight_out(va, w, bias, out_ch)
    elif groups == in_ch == out_ch:
        facts = va.dim_or_unknown(x, 1, in_ch)
        wf = va.dim_or_unknown(w, 0, in_ch)
        b = bias if bias is not None else np.zeros(in_ch)
        vanish = (facts.const == 0) | (wf.const == 0)
        const = np.where(vanish, b, np.nan)
        keys = np.stack([facts.cls.astype(np.float64), wf.cls.astype(np.float64), *_bias_keys(b)], axis=1)
        result[1] = DimFacts(const, relabel(keys, const))
    return result


@value_rule("aten.batch_norm", "aten._native_batch_norm_legit_no_training")
def batch_norm(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Any:
    x = a["input"]
    n = shape_of(x)[1]
    facts = va.dim_or_unknown(x, 1, n)

    def vec(name: str, default: float) -> np.ndarray:
        p = a.get(name)
        return va.vector(p, n) if p is not None else np.full(n, default)

    if a.get("training") or a.get("running_mean") is None or a.get("running_var") is None:
        return _batch_stats_norm(va, node, a)  # normalised by its own statistics, like instance_norm
    scale = vec("weight", 1.0) / np.sqrt(vec("running_var", 1.0) + float(a["eps"]))
    shift = vec("bias", 0.0) - vec("running_mean", 0.0) * scale
    const = np.where(scale == 0, shift, facts.const * scale + shift)
    keys = np.stack([facts.cls.astype(np.float64), *_bias_keys(scale), *_bias_keys(shift)], axis=1)
    out: Facts = [None] * len(shape_of(x))
    out[1] = DimFacts(const, relabel(keys, const))
    if op_name(node) == "aten._native_batch_norm_legit_no_training":
        return [out, None, None]
    return out


@value_rule("aten.instance_norm")
def instance_norm(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    return _batch_stats_norm(va, node, a)


def _batch_stats_norm(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Any:
    """A per-channel norm with its own statistics: a constant channel normalises to its bias."""
    x = a["input"]
    n = shape_of(x)[1]
    facts = va.dim_or_unknown(x, 1, n)
    w = va.vector(a["weight"], n) if a.get("weight") is not None else np.ones(n)
    b = va.vector(a["bias"], n) if a.get("bias") is not None else np.zeros(n)
    const = np.where(~np.isnan(facts.const) | (w == 0), b, np.nan)
    out: Facts = [None] * len(shape_of(x))
    keys = np.stack([facts.cls.astype(np.float64), *_bias_keys(w), *_bias_keys(b)], axis=1)
    out[1] = DimFacts(const, relabel(keys, const))
    if op_name(node) == "aten._native_batch_norm_legit_no_training":
        return [out, None, None]
    return out


@value_rule("aten.group_norm")
def group_norm(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    """A group whose input channels are all constant normalises to zero: the output is the bias."""
    x = a["input"]
    n = shape_of(x)[1]
    groups = int(a["num_groups"])
    facts = va.dim_or_unknown(x, 1, n)
    w = va.vector(a["weight"], n) if a.get("weight") is not None else np.ones(n)
    b = va.vector(a["bias"], n) if a.get("bias") is not None else np.zeros(n)
    group_const = (~np.isnan(facts.const)).reshape(groups, -1).all(axis=1).repeat(n // groups)
    const = np.where(group_const | (w == 0), b, np.nan)
    out: Facts = [None] * len(shape_of(x))
    size = n // groups
    group_label = relabel(facts.cls.reshape(groups, size), np.full(groups, np.nan)).repeat(size)
    offset = np.tile(np.arange(size), groups)
    keys = np.stack(
        [group_label.astype(np.float64), offset.astype(np.float64), *_bias_keys(w), *_bias_keys(b)], axis=1
    )
    out[1] = DimFacts(const, relabel(keys, const))
    return out


@value_rule("aten.embedding")
def embedding(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    out = _none(node)
    if va.live(node, len(out) - 1):
        out[-1] = va.param_facts(a["weight"], 1)
    return out


# ---- per-channel ops ---------------------------------------------------------------------------
KEEPS_CONSTANT = {
    "aten.max_pool1d",
    "aten.max_pool2d",
    "aten.max_pool3d",
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
}


@value_rule(*KEEPS_CONSTANT, "aten.avg_pool1d", "aten.avg_pool2d", "aten.avg_pool3d")
def channelwise(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Any:
    x = a.get("input", a.get("self"))
    xf = [va.dim(x, d) for d in range(len(shape_of(x)))]
    lead = 2 if isinstance(node.meta["val"], torch.Tensor) and _rank(node) == len(xf) else 1
    keep_const = op_name(node) in KEEPS_CONSTANT
    facts: Facts = []
    for d in range(lead):
        f = xf[d]
        if f is not None and not keep_const:
            f = DimFacts(np.where(f.const == 0, 0.0, np.nan), f.cls)
        facts.append(f)
    val = node.meta["val"]
    if isinstance(val, list | tuple):
        return [facts + [None] * (len(v.shape) - lead) for v in val]
    return facts + [None] * (_rank(node) - lead)


@value_rule("aten.mean", "aten.sum", "aten.amax", "aten.amin")
def reduction(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts | None:
    x = a.get("self", a.get("input"))
    dims = a.get("dim")
    if dims is None or (isinstance(dims, list | tuple) and not dims):
        return None
    dims = [dims] if isinstance(dims, int) else dims
    shape = shape_of(x)
    reduced = {int(d) % len(shape) for d in dims}
    count = np.prod([s if s is not None else np.nan for i, s in enumerate(shape) if i in reduced])
    out: Facts = []
    for d in range(len(shape)):
        if d in reduced:
            if a.get("keepdim"):
                out.append(None)
            continue
        f = va.dim(x, d)
        if f is not None and op_name(node) == "aten.sum":
            f = DimFacts(f.const * count, f.cls)
        out.append(f)
    return out


@value_rule("aten.softmax", "aten._softmax")
def softmax(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a.get("self", a.get("input"))
    shape = shape_of(x)
    d = int(a["dim"]) % len(shape)
    out: Facts = []
    for i in range(len(shape)):
        f = va.dim(x, i) if i != d else None
        if f is not None:
            f = DimFacts(np.where(np.isnan(f.const), np.nan, 1.0 / shape[d]) if shape[d] else f.const, f.cls)
        out.append(f)
    return out


# ---- products ----------------------------------------------------------------------------------
@value_rule("aten.matmul", "aten.bmm", "aten.mm")
def matmul(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x, y = a["self"], a["mat2" if "mat2" in a else "other"]
    rank = _rank(node)
    xr, yr = len(shape_of(x)), len(shape_of(y))
    out = _none(node)
    xf, yf = va.dim(x, xr - 2), va.dim(y, yr - 1)
    if xf is not None:
        out[rank - 2] = DimFacts(np.where(xf.const == 0, 0.0, np.nan), xf.cls)
    if yf is not None:
        out[rank - 1] = DimFacts(np.where(yf.const == 0, 0.0, np.nan), yf.cls)
    for d in range(rank - 2):
        if va.live(node, d):
            parts = [va.dim(t, d - (rank - r)) for t, r in ((x, xr), (y, yr)) if d - (rank - r) >= 0]
            parts = [p for p in parts if p is not None and len(p.const) == shape_of(node)[d]]
            if parts:
                zero = np.any([p.const == 0 for p in parts], axis=0)
                const = np.where(zero, 0.0, np.nan)
                out[d] = DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const))
    return out


@value_rule("aten.scaled_dot_product_attention")
def sdpa(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    q, k, v = a["query"], a["key"], a["value"]
    rank = _rank(node)
    out = _none(node)
    vf = va.dim(v, rank - 1)
    if vf is not None:
        out[rank - 1] = DimFacts(np.where(vf.const == 0, 0.0, np.nan), vf.cls)
    for d in range(rank - 2):
        if va.live(node, d):
            n = shape_of(node)[d]
            parts = [va.dim_or_unknown(t, d, n) for t in (q, k, v)]
            const = np.where(parts[2].const == 0, 0.0, np.nan)
            out[d] = DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const))
    return out


# ---- shape ops ---------------------------------------------------------------------------------
@value_rule("aten.permute")
def permute(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    n = len(shape_of(a["self"]))
    return [va.dim(a["self"], int(d) % n) for d in a["dims"]]


@value_rule("aten.transpose", "aten.swapaxes")
def transpose(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    n = len(shape_of(x))
    facts = [va.dim(x, d) for d in range(n)]
    d0, d1 = int(a["dim0"]) % n, int(a["dim1"]) % n
    facts[d0], facts[d1] = facts[d1], facts[d0]
    return facts


@value_rule("aten.t", "aten.numpy_T")
def t(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    return [va.dim(x, d) for d in reversed(range(len(shape_of(x))))]


@value_rule("aten.unsqueeze")
def unsqueeze(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    facts: Facts = [va.dim(x, d) for d in range(len(shape_of(x)))]
    d = int(a["dim"]) % (len(facts) + 1)
    return facts[:d] + [None] + facts[d:]


@value_rule("aten.squeeze")
def squeeze(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    shape = shape_of(x)
    dims = a.get("dim")
    if dims is None:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        dims = [dims] if isinstance(dims, int) else dims
        drop = {int(d) % len(shape) for d in dims if shape[int(d) % len(shape)] == 1}
    return [va.dim(x, d) for d in range(len(shape)) if d not in drop]


@value_rule("aten.expand", "aten.expand_as")
def expand(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    in_shape, out_shape = shape_of(x), shape_of(node)
    lead = len(out_shape) - len(in_shape)
    facts: Facts = [None] * lead
    for d in range(len(in_shape)):
        keep = not (in_shape[d] == 1 and out_shape[lead + d] != 1)
        facts.append(va.dim(x, d) if keep else None)
    return facts


@value_rule("aten.cat", "aten.concat", "aten.concatenate")
def cat(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    tensors = [t for t in a["tensors"] if is_tensor_node(t) and shape_of(t) != [0]]
    rank = _rank(node)
    d = int(a.get("dim") or 0) % rank
    out: Facts = []
    for i in range(rank):
        if not va.live(node, i):
            out.append(None)
        elif i == d:
            parts = [va.dim_or_unknown(t, i, shape_of(t)[i]) for t in tensors]
            out.append(
                DimFacts(np.concatenate([p.const for p in parts]), np.concatenate([p.cls for p in parts]))
            )
        else:
            n = shape_of(node)[i]
            parts = [va.dim_or_unknown(t, i, n) for t in tensors]
            consts = np.stack([p.const for p in parts])
            const = np.where((consts == consts[0]).all(axis=0), consts[0], np.nan)
            out.append(DimFacts(const, relabel(np.stack([p.cls for p in parts], axis=1), const)))
    return out


@value_rule("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unsafe_split", "aten.tensor_split")
def split(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> list[Facts]:
    x = a["self"]
    shape = shape_of(x)
    d = int(a.get("dim") or 0) % len(shape)
    facts = [va.dim(x, i) for i in range(len(shape))]
    outs, offset = [], 0
    for val in node.meta["val"]:
        size = int(val.shape[d])
        part = list(facts)
        if facts[d] is not None:
            part[d] = facts[d].take(slice(offset, offset + size))
        outs.append(part)
        offset += size
    return outs


@value_rule("getitem")
def getitem(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Any:
    source, index = node.args
    facts = va.facts.get(source)
    if isinstance(facts, list) and isinstance(index, int) and index < len(facts):
        item = facts[index]
        return item if isinstance(item, list) else None
    return None


@value_rule("aten.slice", "aten.narrow")
def slice_(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a.get("self", a.get("input"))
    shape = shape_of(x)
    d = int(a.get("dim") or 0) % len(shape)
    facts = [va.dim(x, i) for i in range(len(shape))]
    if facts[d] is not None:
        if op_name(node) == "aten.narrow":
            start, end, step = a["start"], a["start"] + a["length"], 1
        else:
            start, end, step = a.get("start"), a.get("end"), a.get("step") or 1
        if all(isinstance(v, int | None) for v in (start, end)) and step == 1:
            lo, hi, _ = slice(start, end).indices(shape[d])
            facts[d] = facts[d].take(slice(lo, hi))
        else:
            facts[d] = None
    return facts


@value_rule("aten.select")
def select(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    x = a["self"]
    n = len(shape_of(x))
    d = int(a["dim"]) % n
    return [va.dim(x, i) for i in range(n) if i != d]


@value_rule(*RESHAPES)
def reshape(va: ValueAnalysis, node: Node, a: dict[str, Any]) -> Facts:
    """Map slices through the outermost dims of each block (see rules.reshape)."""
    x = a.get("self", a.get("input"))
    in_sizes, out_sizes = sym_sizes(x), sym_sizes(node)
    blocks = reshape_blocks(in_sizes, out_sizes)
    out: Facts = [None] * len(out_sizes)
    if blocks is None:
        return out
    for ins, outs in blocks:
        in_dims = [i for i in ins if in_sizes[i] != 1]
        out_dims = [o for o in outs if out_sizes[o] != 1]
        if not in_dims or not out_dims:
            continue
        if len(in_dims) == 1 and len(out_dims) == 1:
            out[out_dims[0]] = va.dim(x, in_dims[0])
            continue
        o = out_dims[0]
        facts = va.dim(x, in_dims[0])
        sizes = [as_int(in_sizes[i]) for i in in_dims] + [as_int(out_sizes[j]) for j in out_dims]
        if facts is None or not va.live(node, o) or any(s is None for s in sizes):
            continue
        total = int(np.prod([as_int(in_sizes[i]) for i in in_dims]))
        inner_in = total // as_int(in_sizes[in_dims[0]])
        inner_out = total // as_int(out_sizes[o])
        flat = np.arange(total)
        src = flat // inner_in
        consts = facts.const[src].reshape(-1, inner_out)
        const = np.where((consts == consts[:, :1]).all(axis=1), consts[:, 0], np.nan)
        keys = np.stack([facts.cls[src], flat % inner_in], axis=1).reshape(-1, inner_out * 2)
        out[o] = DimFacts(const, relabel(keys, const))
    return out
