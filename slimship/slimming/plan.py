"""Plan: which channels each space drops or merges, and why every other group stays."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from torch.fx import Node

from slimship.slimming.graph import CONV, LINEAR, MERGEABLE_SITES, ChannelGraph, Site, iter_dims, unique_ints
from slimship.slimming.values import ValueAnalysis, row_inverse

KEEP_ONE = "a space keeps at least one channel"


@dataclass
class Fold:
    """Constant channels folded into the consumer's bias before they are removed."""

    site: Site
    positions: np.ndarray
    consts: np.ndarray
    comp: int


@dataclass
class Plan:
    removed: np.ndarray  # per component
    merged_into: dict[int, int]
    folds: list[Fold]
    kept_reason: dict[int, str]  # unpinned components that stay, and why
    keep: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.keep = ~self.removed
        for comp in self.merged_into:
            self.keep[comp] = False

    @property
    def changes(self) -> int:
        return int(self.removed.sum()) + len(self.merged_into)


@dataclass
class _SiteView:
    site: Site
    comps: np.ndarray  # component of each position j along the site's dim
    zero: np.ndarray  # some operand is provably zero at j
    const: np.ndarray  # input operand's constant at j (NaN unknown)
    cls: np.ndarray  # input operand's equality labels
    foldable: bool
    mergeable: bool


def make_plan(g: ChannelGraph, va: ValueAnalysis, merge: bool = True, fold: bool = True) -> Plan:
    assert g.pinned is not None and g.component is not None
    ncomp = len(g.pinned)
    weight_uses = Counter(s.weight.target for s in g.sites if s.weight is not None)
    views = [_site_view(g, va, s, weight_uses) for s in g.sites]
    runs = [_runs(view.comps) for view in views]
    bad = np.zeros(ncomp, dtype=bool)  # some site neither sees it zero nor can fold it
    seen = np.zeros(ncomp, dtype=bool)  # consumed at some site
    unmergeable = np.zeros(ncomp, dtype=bool)  # consumed at a site that cannot merge
    fold_at: list[tuple[int, int, np.ndarray]] = []  # (comp, site index, positions) to fold if removed
    for index, (view, (comps, order, starts, ends)) in enumerate(zip(views, runs, strict=True)):
        if not len(comps):
            continue
        seen[comps] = True
        if not view.mergeable:
            unmergeable[comps] = True
        all_zero = np.logical_and.reduceat(view.zero[order], starts)
        foldable = np.zeros(len(comps), dtype=bool)
        if fold and view.foldable:
            foldable = np.logical_and.reduceat(~np.isnan(view.const[order]), starts) & ~all_zero
        bad[comps[~(all_zero | foldable)]] = True
        fold_at.extend((int(comps[k]), index, order[starts[k] : ends[k]]) for k in np.flatnonzero(foldable))

    removed = ~g.pinned & ~bad
    folds: dict[int, list[Fold]] = {}
    for comp, index, pos in sorted(fold_at, key=lambda f: (f[0], f[1])):
        if removed[comp]:
            view = views[index]
            consts = np.where(view.zero[pos], 0.0, view.const[pos])
            folds.setdefault(comp, []).append(Fold(view.site, pos, consts, comp))
    kept_reason: dict[int, str] = {
        int(comp): "not provably zero, constant or equal to another channel where it is consumed"
        for comp in np.flatnonzero(~g.pinned & bad)
    }

    merged_into: dict[int, int] = {}
    if merge:
        eligible = seen & ~g.pinned & ~removed & ~unmergeable
        for members in _equal_signatures(views, runs, eligible):
            rep = min(members)
            for other in members:
                if other != rep:
                    merged_into[other] = rep
                    kept_reason.pop(other, None)
            kept_reason.pop(rep, None)

    _keep_one_per_dim(g, removed, merged_into, folds, kept_reason)
    return Plan(removed, merged_into, [f for fs in folds.values() for f in fs], kept_reason)


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values (ascending), a stable sorting order, and where each value's run starts and
    ends in it: value k sits at positions order[starts[k]:ends[k]] (ascending)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]])) if len(values) else order
    ends = np.append(starts[1:], len(order)).astype(np.int64) if len(values) else order
    return ordered[starts], order, starts, ends


def _equal_signatures(views: list[_SiteView], runs: list, eligible: np.ndarray) -> list[list[int]]:
    """Groups (of two or more) of eligible components with the same equality labels at every site.

    A component's signature is the sequence, over the sites that consume it (in site order), of
    the labels at its positions there. Groups come in the order of their first member, members in
    the order of (first consuming site, component).
    """
    rows = []  # per (component, site): component, site, kind (one position or several), code
    interned: dict[tuple, int] = {}
    for index, (view, (comps, order, starts, ends)) in enumerate(zip(views, runs, strict=True)):
        chosen = np.flatnonzero(eligible[comps]) if len(comps) else np.zeros(0, dtype=np.int64)
        if not len(chosen):
            continue
        single = (ends - starts)[chosen] == 1
        code = np.zeros(len(chosen), dtype=np.int64)
        code[single] = view.cls[order[starts[chosen[single]]]]
        for j in np.flatnonzero(~single):
            k = chosen[j]
            code[j] = interned.setdefault(tuple(view.cls[order[starts[k] : ends[k]]].tolist()), len(interned))
        site = np.full(len(chosen), index, dtype=np.int64)
        rows.append(np.stack([comps[chosen], site, (~single).astype(np.int64), code], axis=1))
    if not rows:
        return []
    table = np.concatenate(rows)
    table = table[np.lexsort((table[:, 1], table[:, 0]))]  # by component, then site
    comps, first, n_sites = np.unique(table[:, 0], return_index=True, return_counts=True)
    # refine a signature id one site at a time: equal ids <=> equal prefixes (among equal lengths)
    sig = np.zeros(len(comps), dtype=np.int64)
    for r in range(int(n_sites.max())):
        has = np.flatnonzero(n_sites > r)
        at = table[first[has] + r]
        sig[has] = row_inverse(np.stack([sig[has], at[:, 1], at[:, 2], at[:, 3]], axis=1))
    sig = row_inverse(np.stack([sig, n_sites], axis=1))
    order = np.lexsort((comps, table[first, 1]))  # by first consuming site, then component
    size = np.bincount(sig)
    groups: dict[int, list[int]] = {}
    for k in order[size[sig[order]] > 1]:
        groups.setdefault(int(sig[k]), []).append(int(comps[k]))
    return list(groups.values())


def _site_view(g: ChannelGraph, va: ValueAnalysis, site: Site, weight_uses: Counter) -> _SiteView:
    node0, dim0 = site.operands[0]
    ids = g.layouts[node0][dim0]
    n = len(ids)
    zero = np.zeros(n, dtype=bool)
    for node, dim in site.operands:
        const = va.const(node, dim)
        if const is not None:
            zero |= const == 0
    facts0 = va.dim_or_unknown(node0, dim0, n)
    weighted = site.kind in (LINEAR, CONV) or site.kind in MERGEABLE_SITES
    has_param_weight = site.weight is not None and site.weight.op == "get_attr"
    single_use = has_param_weight and weight_uses[site.weight.target] == 1
    bias_param = site.bias is not None and site.bias.op == "get_attr" and weight_uses[site.weight.target] == 1
    return _SiteView(
        site=site,
        comps=g.comps(ids),
        zero=zero,
        const=facts0.const,
        cls=facts0.cls,
        foldable=bool(site.foldable and single_use and bias_param and site.kind in (LINEAR, CONV)),
        mergeable=bool(weighted and site.kind in MERGEABLE_SITES and has_param_weight),
    )


def _keep_one_per_dim(
    g: ChannelGraph,
    removed: np.ndarray,
    merged_into: dict[int, int],
    folds: dict[int, list[Fold]],
    kept_reason: dict[int, str],
) -> None:
    """No tracked dim may lose every position: restore its first removed component."""
    dims = [ids for layout in g.layouts.values() for ids in iter_dims(layout) if len(ids)]
    changed = True
    while changed:
        changed = False
        gone = removed.copy()
        gone[list(merged_into)] = True
        for ids in dims:
            comps = g.component[ids]
            if gone[comps].all():
                first = int(comps[0])
                removed[first] = False
                folds.pop(first, None)
                kept_reason[first] = KEEP_ONE
                gone[first] = False
                changed = True


def spaces(g: ChannelGraph) -> dict[str, list[tuple[Node, int]]]:
    """Group parameter dims that share channels into named spaces (named by their first producer)."""
    assert g.component is not None
    param_dims = []
    for node, layout in g.layouts.items():
        if node.op != "get_attr" or layout is None:
            continue
        for d, ids in enumerate(layout):
            if ids is None or not len(ids) or (node, d) in g.stat_dims:
                continue
            if not g.pinned[g.component[ids]].all() or (node, d) in g.consumer_dims or d == 0:
                param_dims.append((node, d))
    ncomp = len(g.pinned)
    rows, cols = [], []
    for node, d in param_dims:
        comps = unique_ints(g.component[g.layouts[node][d]])
        rows.append(comps[:-1])
        cols.append(comps[1:])
    rows_a = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols_a = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    matrix = scipy.sparse.coo_matrix(
        (np.ones(len(rows_a), dtype=np.int8), (rows_a, cols_a)), shape=(ncomp, ncomp)
    )
    _, label = scipy.sparse.csgraph.connected_components(matrix, directed=False)
    grouped: dict[int, list[tuple[Node, int]]] = defaultdict(list)
    seen_targets: set[tuple[str, int]] = set()
    for node, d in param_dims:
        key = (str(node.target), d)
        if key in seen_targets:
            continue
        seen_targets.add(key)
        grouped[int(label[g.component[g.layouts[node][d][0]]])].append((node, d))
    named: dict[str, list[tuple[Node, int]]] = {}
    for members in grouped.values():
        producers = [(n, d) for n, d in members if (n, d) not in g.consumer_dims] or members
        node, d = producers[0]
        named[f"{node.target}[{d}]"] = members
    return named
