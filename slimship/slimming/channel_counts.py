"""Per-space kept-channel counts: keep more channels than needed where the target runs faster with them.

Slimming plans, per channel space, the channels it must keep (`needed`: those not provably removable);
the others may go. Keeping a few of them back is exact (they are real channels, outputs are unchanged)
and can be faster, because kernels work in blocks of channels. `channel_counts` in `slim` takes either a
mapping (space name -> kept count) or a `ChannelCountPolicy`, which sees every space (its needed and
total counts and the conv / linear layers it feeds and is fed by, with their shapes) and returns the
counts. `LatencyAwareCounts` is the measured policy: per space it compares the latency of the space's
layers (a `LatencySource`: an injected table, or `slimship.runtimes.latency_table.MeasuredLatency`
timing them on a target) at the needed count and at a few counts rounded up, and keeps extra
channels only where they make those layers faster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from slimship.errors import SlimmingError
from slimship.slimming.graph import ChannelGraph
from slimship.slimming.plan import Plan

ROUND_UP_MULTIPLES = (4, 8, 16)  # candidate kept counts: the needed count rounded up to each
FASTER_MARGIN = 0.03  # a rounded-up count must make the space's layers this much faster to be kept


# ---- layers and the spaces they touch ------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One conv2d or linear layer as it runs (batch 1): the key of a latency table.

    conv: input (1, in_channels, *size), weight (out_channels, in_channels // groups, *kernel).
    linear: input (size[0], in_channels) (size[0]: the rows, i.e. the leading dims multiplied out).
    """

    op: str  # "conv" | "linear"
    in_channels: int
    out_channels: int
    size: tuple[int, int]  # conv: input height, width; linear: (rows, 1)
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def depthwise(self) -> bool:
        return self.op == "conv" and self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def out_size(self) -> tuple[int, int]:
        if self.op == "linear":
            return self.size
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                self.size, self.padding, self.dilation, self.kernel, self.stride, strict=True
            )
        )


@dataclass(frozen=True)
class SpaceProbe:
    """The layers of one space at one kept count: producers write the space (their inputs come from other
    spaces), inner layers read and write it (depthwise convs, a residual block's conv whose input and output
    are the space), consumers read it. A latency source times them as one small network: producers ->
    inner -> consumers."""

    producers: tuple[LayerShape, ...]
    inner: tuple[LayerShape, ...]
    consumers: tuple[LayerShape, ...]

    @property
    def layers(self) -> tuple[LayerShape, ...]:
        return self.producers + self.inner + self.consumers


@dataclass(frozen=True)
class _Layer:
    name: str  # the weight's parameter name
    shape: LayerShape
    weight: Any  # fx get_attr node
    out_space: str | None
    in_space: str | None  # None: depthwise (reads out_space) or grouped/pinned input


@dataclass
class SpaceView:
    """What a policy sees: per space its components, which must stay, and the layers around it."""

    graph: ChannelGraph
    plan: Plan
    comps: dict[str, np.ndarray]  # space -> its components (sorted)
    layers: list[_Layer] = field(default_factory=list)

    def needed(self, space: str) -> int:
        return int(self.plan.keep[self.comps[space]].sum())

    def total(self, space: str) -> int:
        return len(self.comps[space])

    def dropped(self, space: str) -> list[int]:
        return [int(c) for c in self.comps[space] if not self.plan.keep[c]]

    def keep_mask(self, counts: Mapping[str, int]) -> np.ndarray:
        """Per component: kept when the spaces keep `counts` channels (others: what the plan keeps)."""
        keep = self.plan.keep.copy()
        for space, k in counts.items():
            keep[self.dropped(space)[: max(k - self.needed(space), 0)]] = True
        return keep

    def probe(self, space: str, counts: Mapping[str, int]) -> SpaceProbe:
        """The layers around `space` with every space at `counts` (missing ones: the needed count)."""
        keep = self.keep_mask(counts)
        producers, inner, consumers = [], [], []
        for layer in self.layers:
            shape = self._shape_at(layer, keep)
            if layer.out_space == space and (layer.shape.depthwise or layer.in_space == space):
                inner.append(shape)  # reads and writes the space (depthwise, a residual block's conv)
            elif layer.out_space == space:
                producers.append(shape)
            elif layer.in_space == space:
                consumers.append(shape)
        return SpaceProbe(tuple(producers), tuple(inner), tuple(consumers))

    def _shape_at(self, layer: _Layer, keep: np.ndarray) -> LayerShape:
        g = self.graph
        out = int(keep[g.component[g.layouts[layer.weight][0]]].sum())
        if layer.shape.depthwise:
            return replace(layer.shape, in_channels=out, out_channels=out, groups=out)
        cin = layer.shape.in_channels
        if layer.shape.groups == 1:
            cin = int(keep[g.component[g.layouts[layer.weight][1]]].sum())
        return replace(layer.shape, in_channels=cin, out_channels=out)


def space_view(graph: ChannelGraph, plan: Plan, named: Mapping[str, list]) -> SpaceView:
    """The spaces of `named` with their components and the conv2d / linear layers of the graph."""
    comps = {
        name: np.unique(np.concatenate([graph.component[graph.layouts[n][d]] for n, d in members]))
        for name, members in named.items()
    }
    space_of = {int(c): name for name, cs in comps.items() for c in cs}
    view = SpaceView(graph, plan, comps)
    for node in graph.gm.graph.nodes:
        shape = _layer_shape(node)
        if shape is None:
            continue
        weight = node.args[1]
        layout = graph.layouts.get(weight)
        if layout is None or layout[0] is None or not len(layout[0]):
            continue
        out_space = space_of.get(int(graph.component[layout[0][0]]))
        in_space = None
        if shape.groups == 1 and len(layout) > 1 and layout[1] is not None and len(layout[1]):
            in_space = space_of.get(int(graph.component[layout[1][0]]))
        view.layers.append(_Layer(str(weight.target), shape, weight, out_space, in_space))
    return view


def _pair(v: Any, default: int) -> tuple[int, int]:
    if v is None:
        return (default, default)
    v = list(v) if isinstance(v, list | tuple) else [v]
    return (int(v[0]), int(v[-1]))


def _layer_shape(node: Any) -> LayerShape | None:
    """The LayerShape of an aten conv2d / linear node whose weight is a parameter, else None."""
    aten = torch.ops.aten
    if node.op != "call_function" or node.target not in (aten.conv2d.default, aten.linear.default):
        return None
    x, weight = node.args[0], node.args[1]
    if getattr(weight, "op", None) != "get_attr":
        return None
    xv, wv = x.meta.get("val"), weight.meta.get("val")
    if xv is None or wv is None:
        return None
    xs = [s if isinstance(s, int) else 1 for s in xv.shape]  # a symbolic size (the batch): 1
    if node.target is aten.linear.default:
        rows = math.prod(xs[1:-1]) if len(xs) > 2 else 1
        return LayerShape("linear", int(wv.shape[1]), int(wv.shape[0]), (rows, 1))
    if len(xs) != 4:
        return None
    args = list(node.args) + [None] * 7
    kw = node.kwargs
    groups = int(args[6] if args[6] is not None else kw.get("groups", 1))
    return LayerShape(
        "conv", xs[1], int(wv.shape[0]), (xs[2], xs[3]), (int(wv.shape[2]), int(wv.shape[3])),
        _pair(args[3] if args[3] is not None else kw.get("stride"), 1),
        _pair(args[4] if args[4] is not None else kw.get("padding"), 0),
        _pair(args[5] if args[5] is not None else kw.get("dilation"), 1),
        groups,
    )  # fmt: skip


# ---- applying counts -----------------------------------------------------------------------------
def keep_components(plan: Plan, comps: Sequence[int] | np.ndarray, reason: str) -> None:
    """Keep `comps` (undo their removal or merge, and merges into them), with `reason` in the report."""
    for comp in comps:
        comp = int(comp)
        if plan.removed[comp] or comp in plan.merged_into:
            plan.removed[comp] = False
            plan.merged_into.pop(comp, None)
            plan.kept_reason[comp] = reason
        for other, rep in list(plan.merged_into.items()):
            if rep == comp:
                plan.merged_into.pop(other)
                plan.kept_reason[other] = reason
    plan.folds = [f for f in plan.folds if plan.removed[f.comp]]
    plan.__post_init__()


def apply_counts(view: SpaceView, counts: Mapping[str, int], reason: str) -> None:
    """Keep `counts[space]` channels in each space: the needed ones plus the first dropped ones. A count
    below the needed one keeps the needed ones; a count above the space's width or an unknown space is
    an error."""
    for space, k in counts.items():
        if space not in view.comps:
            known = ", ".join(sorted(view.comps)[:8])
            raise SlimmingError(
                f"channel_counts names space {space!r}, which the model does not have ({known} ...)"
            )
        if not 0 <= int(k) <= view.total(space):
            raise SlimmingError(
                f"channel_counts[{space!r}] is {k}; the space has {view.total(space)} channels"
            )
    for space, k in counts.items():
        extra = view.dropped(space)[: max(int(k) - view.needed(space), 0)]
        if extra:
            keep_components(view.plan, np.array(extra, dtype=np.int64), reason.format(count=int(k)))


def aligned_counts(view: SpaceView, multiple: int) -> dict[str, int]:
    """Each space that drops channels rounded up to `multiple` (never beyond its width)."""
    out = {}
    for space in view.comps:
        if view.dropped(space):
            n = view.needed(space)
            out[space] = min(math.ceil(n / multiple) * multiple, view.total(space))
    return out


# ---- policies ------------------------------------------------------------------------------------
@runtime_checkable
class ChannelCountPolicy(Protocol):
    """Chooses each space's kept count from what slimming must keep and the layers around it."""

    reason: str  # the report's reason for channels kept beyond the needed ones ({count} is filled in)

    def choose(self, view: SpaceView) -> Mapping[str, int]: ...


class LatencySource(Protocol):
    """Latency (any unit, lower is faster) of each probe's layers on one target."""

    def latencies(self, probes: Sequence[Sequence[SpaceProbe]]) -> list[list[float]]:
        """One list per space: the latency of each of its candidate probes (compared within the list)."""
        ...


@dataclass
class TableLatency:
    """A LatencySource from a table: a probe's latency is the sum of its layers' entries."""

    table: Mapping[LayerShape, float]

    def latencies(self, probes: Sequence[Sequence[SpaceProbe]]) -> list[list[float]]:
        out = []
        for group in probes:
            row = []
            for probe in group:
                missing = [s for s in probe.layers if s not in self.table]
                if missing:
                    raise SlimmingError(f"latency table has no entry for layer {missing[0]}")
                row.append(float(sum(self.table[s] for s in probe.layers)))
            out.append(row)
        return out


def candidate_counts(needed: int, total: int, multiples: Sequence[int] = ROUND_UP_MULTIPLES) -> list[int]:
    """The needed count and its round-ups to each multiple, never beyond `total` (ascending)."""
    if needed <= 0:
        return [needed]
    ups = {min(math.ceil(needed / m) * m, total) for m in multiples}
    return sorted({needed, *ups})


@dataclass(frozen=True)
class SpaceDecision:
    space: str
    needed: int
    total: int
    candidates: tuple[int, ...]
    latencies: tuple[float, ...]
    chosen: int


@dataclass
class LatencyAwareCounts:
    """Per space, the kept count whose layers run fastest: the needed count unless a rounded-up one
    (`multiples`) is at least `margin` faster (then the smallest count within `margin` of the fastest).
    `passes` > 1 re-decides each space with its neighbours at the counts chosen in the pass before; with
    `start` the first pass sees its neighbours rounded up to that multiple (kernels that switch layout
    only when every layer around them is aligned, as onnxruntime's NCHWc, pay only in such a neighbourhood,
    so a pass from the needed counts alone would never find it).
    `decisions` holds the last choice made, per space."""

    source: LatencySource
    multiples: tuple[int, ...] = ROUND_UP_MULTIPLES
    margin: float = FASTER_MARGIN
    passes: int = 1
    prefer_aligned: bool = False  # among counts within `margin` of the fastest: the most aligned one
    start: int | None = (
        None  # first pass: neighbours rounded up to this multiple (None: at their needed counts)
    )
    reason: str = "kept for latency (measured faster at {count} on the target)"
    decisions: dict[str, SpaceDecision] = field(default_factory=dict)

    def choose(self, view: SpaceView) -> dict[str, int]:
        spaces = {}
        for space in view.comps:
            n, total = view.needed(space), view.total(space)
            cands = candidate_counts(n, total, self.multiples)
            if len(cands) > 1 and view.probe(space, {}).layers:
                spaces[space] = (n, total, cands)
        counts: dict[str, int] = {}
        if self.start:  # the first pass sees every neighbour rounded up (an aligned neighbourhood)
            counts = {s: min(math.ceil(n / self.start) * self.start, t) for s, (n, t, _) in spaces.items()}
        for _ in range(max(self.passes, 1)):
            names = list(spaces)
            probes = [[view.probe(s, {**counts, s: c}) for c in spaces[s][2]] for s in names]
            measured = self.source.latencies(probes) if probes else []
            new = {}
            for s, lat in zip(names, measured, strict=True):
                n, total, cands = spaces[s]
                chosen = fastest_count(cands, lat, self.margin, self.prefer_aligned)
                new[s] = chosen
                self.decisions[s] = SpaceDecision(s, n, total, tuple(cands), tuple(lat), chosen)
            if new == counts:
                break
            counts = new
        return {s: k for s, k in counts.items() if k != spaces[s][0]}


def fastest_count(cands: Sequence[int], lat: Sequence[float], margin: float, aligned: bool = False) -> int:
    """The needed count (cands[0]) unless one rounded up is `margin` faster; then, among the counts
    within `margin` of the fastest one, the smallest (fewest FLOPs) or with `aligned` the one divisible
    by the largest power of two (its neighbours' layers then meet a count the kernels block by)."""
    best = min(lat)
    if not best < lat[0] * (1.0 - margin):
        return cands[0]
    near = [c for c, t in zip(cands, lat, strict=True) if t <= best * (1.0 + margin)]
    return max(near, key=lambda c: ((c & -c), -c)) if aligned else near[0]


def resolve_counts(
    view: SpaceView, counts: Mapping[str, int] | ChannelCountPolicy
) -> tuple[Mapping[str, int], str]:
    """The counts to apply and the report's reason for the channels they keep back."""
    if isinstance(counts, ChannelCountPolicy):
        return counts.choose(view), counts.reason
    if not isinstance(counts, Mapping):
        raise SlimmingError(
            f"channel_counts must be a mapping space -> count or a policy, got {type(counts).__name__}"
        )
    return counts, "kept by request (channel_counts: {count})"
