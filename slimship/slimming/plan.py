"""Plan: which channels each space drops or merges, and why every other group stays."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from torch.fx import Node

from slimship.slimming.graph import CONV, LINEAR, MERGEABLE_SITES, ChannelGraph, Site, iter_dims
from slimship.slimming.values import ValueAnalysis

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
    at_sites: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for index, view in enumerate(views):
        for comp in np.unique(view.comps):
            if not g.pinned[comp]:
                at_sites[int(comp)].append((index, np.flatnonzero(view.comps == comp)))

    removed = np.zeros(ncomp, dtype=bool)
    folds: dict[int, list[Fold]] = {}
    kept_reason: dict[int, str] = {}
    for comp in np.flatnonzero(~g.pinned):
        comp = int(comp)
        ok, comp_folds = True, []
        for index, pos in at_sites.get(comp, []):
            view = views[index]
            if view.zero[pos].all():
                continue
            if fold and view.foldable and not np.isnan(view.const[pos]).any():
                comp_folds.append(Fold(view.site, pos, np.where(view.zero[pos], 0.0, view.const[pos]), comp))
                continue
            ok = False
            break
        if ok:
            removed[comp] = True
            if comp_folds:
                folds[comp] = comp_folds
        else:
            kept_reason[comp] = "not provably zero, constant or equal to another channel where it is consumed"

    merged_into: dict[int, int] = {}
    if merge:
        by_signature: dict[tuple, list[int]] = defaultdict(list)
        for comp, sites in at_sites.items():
            if removed[comp] or not all(views[i].mergeable for i, _ in sites):
                continue
            signature = tuple(
                (i, tuple(views[i].cls[pos].tolist())) for i, pos in sorted(sites, key=lambda s: s[0])
            )
            by_signature[signature].append(comp)
        for members in by_signature.values():
            rep = min(members)
            for other in members:
                if other != rep:
                    merged_into[other] = rep
                    kept_reason.pop(other, None)
            if len(members) > 1:
                kept_reason.pop(rep, None)

    _keep_one_per_dim(g, removed, merged_into, folds, kept_reason)
    return Plan(removed, merged_into, [f for fs in folds.values() for f in fs], kept_reason)


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
        comps = np.unique(g.component[g.layouts[node][d]])
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
