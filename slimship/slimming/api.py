"""Public entry points: `slim`, `find_groups`, `zero_random_groups`, `make_random_identical`."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimship.errors import SlimmingError, VerificationError
from slimship.slimming.channel_counts import (
    ChannelCountPolicy,
    aligned_counts,
    apply_counts,
    keep_components,
    resolve_counts,
    space_view,
)
from slimship.slimming.graph import ChannelGraph, Unreadable, get_tensor, slice_index
from slimship.slimming.plan import Plan, make_plan, spaces
from slimship.slimming.release import DenseRelease
from slimship.slimming.rewrite import Release, rewrite
from slimship.slimming.rules import build_channel_graph
from slimship.slimming.trace import as_input_tuple, shared_copy, trace
from slimship.slimming.values import ValueAnalysis
from slimship.slimming.verify import (  # noqa: F401 - Verification, verify_outputs, ... re-exported
    Reference,
    Verification,
    accumulation_depth,
    check_against,
    check_outputs,
    lowest_precision,
    random_like_inputs,
    reference_outputs,
    verify_bound,
    verify_outputs,
)

log = logging.getLogger(__name__)


# ---- results ---------------------------------------------------------------------------------
@dataclass
class SpaceReport:
    name: str
    channels_before: int
    channels_after: int
    removed: int
    merged: int
    kept: dict[str, int]  # reason -> channels


@dataclass
class LayerReport:
    name: str
    shape_before: list[int]
    shape_after: list[int]


@dataclass
class SlimReport:
    spaces: list[SpaceReport]
    layers: list[LayerReport]
    unsupported_ops: dict[str, list[str]]
    verification: Verification | None
    excluded_spaces: list[str] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)  # nodes a rule could not read: pinned

    def kept_channels(self) -> dict[str, list[int]]:
        """Per space: [before, after]."""
        return {s.name: [s.channels_before, s.channels_after] for s in self.spaces}


@dataclass
class SlimResult:
    model: torch.fx.GraphModule
    report: SlimReport
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    bytes_before: int
    bytes_after: int
    dynamic_batch: bool
    _new_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def flops_ratio(self) -> float:
        return self.flops_before / max(self.flops_after, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_ratio": round(self.flops_ratio, 4),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "channels": self.report.kept_channels(),
            "verification": self.report.verification,
        }

    def apply_to(self, module: nn.Module, example_inputs: Any, rtol: float = 1e-5) -> nn.Module:
        """Write the slim weights back into the user's own module objects (standard modules only).

        Sizes kept in attributes (`in_channels`, `num_features`, ...) are updated; the result is
        verified against the slim graph and a VerificationError is raised if the module's own
        forward does not match (for example because it hard-codes a size).
        """
        for name, tensor in self._new_tensors.items():
            prefix, _, leaf = name.rpartition(".")
            owner = module.get_submodule(prefix) if prefix else module
            old = getattr(owner, leaf)
            if old is tensor:  # already there (slim(..., release_source=True)): no copy
                continue
            if isinstance(old, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(tensor.clone(), requires_grad=old.requires_grad))
            else:
                owner._buffers[leaf] = tensor.clone()
        for sub in module.modules():
            _sync_attributes(sub)
        check = check_outputs(self.model, module, as_input_tuple(example_inputs), rtol=rtol, what="apply_to")
        if not check.passed:
            what = check.error or check.reason
            raise VerificationError(
                f"apply_to: the module's own forward does not match the slim graph ({what}); it may hard-code"
                " a size. Use result.model (a GraphModule) instead"
            )
        return module


_SIZE_ATTRS = {
    nn.Linear: lambda m: {"in_features": m.weight.shape[1], "out_features": m.weight.shape[0]},
    nn.Embedding: lambda m: {"embedding_dim": m.weight.shape[1]},
}


def _sync_attributes(m: nn.Module) -> None:
    if isinstance(m, nn.modules.conv._ConvNd):
        w = m.weight.shape
        if m.transposed:
            m.in_channels, m.out_channels = w[0], w[1] * m.groups
        else:
            m.out_channels, m.in_channels = w[0], w[1] * m.groups
            if m.groups > 1:
                m.groups = m.in_channels = m.out_channels
    elif isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
        m.num_features = m.running_mean.shape[0]
    elif isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None:
        m.num_features = m.weight.shape[0]
    elif isinstance(m, nn.GroupNorm) and m.weight is not None:
        m.num_channels = m.weight.shape[0]
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)
    for cls, attrs in _SIZE_ATTRS.items():
        if isinstance(m, cls):
            for key, value in attrs(m).items():
                setattr(m, key, value)


# ---- measuring -------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def count_flops(model: nn.Module, example_inputs: tuple[Any, ...]) -> int:
    """FLOPs of one forward pass, counted by torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*example_inputs)
    return int(counter.get_total_flops())


# ---- slimming --------------------------------------------------------------------------------
_Counts = int | Mapping[str, int] | ChannelCountPolicy | None  # channel_multiple or channel_counts


@dataclass
class _Analysis:
    graph: ChannelGraph
    plan: Plan
    spaces: dict[str, list]


def _analyse(
    gm: torch.fx.GraphModule,
    merge: bool,
    fold: bool,
    exclude: set[str],
    counts: _Counts = None,
    unreadable: dict[str, str] | None = None,
) -> _Analysis:
    g = build_channel_graph(gm, unreadable)
    plan = make_plan(g, ValueAnalysis(g), merge=merge, fold=fold)  # the analysis (and its tensors) go
    named = spaces(g)
    for name in exclude:
        for node, d in named.get(name, []):
            comps = np.unique(g.component[g.layouts[node][d]])
            keep_components(plan, comps, "kept in place: slimming this space did not verify")
    if isinstance(counts, int):
        if counts > 1:
            view = space_view(g, plan, named)
            apply_counts(
                view, aligned_counts(view, counts), f"kept for channel alignment (multiple of {counts})"
            )
    elif counts is not None:
        view = space_view(g, plan, named)
        apply_counts(view, *resolve_counts(view, counts))
    return _Analysis(g, plan, named)


def _report_spaces(a: _Analysis) -> list[SpaceReport]:
    g, plan = a.graph, a.plan
    reps = set(plan.merged_into.values())
    out = []
    for name, members in a.spaces.items():
        comps = np.unique(np.concatenate([g.component[g.layouts[n][d]] for n, d in members]))
        removed = int(plan.removed[comps].sum())
        merged = sum(1 for c in comps if int(c) in plan.merged_into)
        kept: Counter[str] = Counter()
        for c in comps:
            c = int(c)
            if g.pinned[c]:
                kept[g.pin_reason.get(c, "pinned")] += 1
            elif plan.keep[c]:
                default = "representative of merged channels" if c in reps else "kept"
                kept[plan.kept_reason.get(c, default)] += 1
        out.append(SpaceReport(name, len(comps), len(comps) - removed - merged, removed, merged, dict(kept)))
    return out


def slim(
    model: nn.Module,
    example_inputs: Any,
    *,
    merge: bool = True,
    fold_constants: bool = True,
    rtol: float = 1e-5,
    n_random: int = 2,
    dynamic_batch: bool = True,
    seed: int = 0,
    channel_multiple: int | None = None,
    release_source: bool = False,
    channel_counts: Mapping[str, int] | ChannelCountPolicy | None = None,
) -> SlimResult:
    """Remove zero-invariant channel groups and merge identical ones; verify the result numerically.

    Returns a SlimResult whose `.model` is a GraphModule with the source's parameter names. A space
    whose rewrite does not verify is kept in place (named in `report.excluded_spaces`); if the model
    still does not match, a VerificationError is raised. `channel_multiple` rounds every space's kept
    channels up to that multiple (see `slimship.runtimes.measure_alignment` for a target's value);
    `channel_counts` instead sets each space's kept count: a mapping (space name as in the report ->
    count; a space not named keeps what it needs) or a policy such as `LatencyAwareCounts`, which keeps
    extra channels only where the target's measured latency says they make the space's layers faster.
    Extra kept channels are real channels, so the result stays exact.

    No weight is copied: the trace shares the model's tensors, the reference outputs are computed
    before the rewrite, and the rewrite makes one new tensor at a time, in the model's dtype. The
    bound is `rtol` relative to the outputs, or the rounding a changed summation order can cause in
    the model's dtype at its accumulation depth where that is larger (bf16, fp16). The slim model
    shares the tensors slimming left unchanged with `model`: deep-copy one of them before training
    both apart. By default the model is left as it was (peak memory: the model plus its changed
    tensors in slim form); with
    `release_source=True` each dense tensor is released as its slim one is made (spilled to a temp
    file first, to retry from), so the peak stays near the model's own size, and the model's
    modules are left holding the slim tensors (as after `apply_to`).
    """
    if channel_multiple is not None and channel_counts is not None:
        raise SlimmingError("give channel_multiple or channel_counts, not both")
    counts: _Counts = channel_counts if channel_counts is not None else channel_multiple
    inputs = as_input_tuple(example_inputs)
    traced = trace(model, inputs, dynamic_batch=dynamic_batch)
    pristine = traced.gm
    reference = reference_outputs(pristine, inputs, n_random, seed, merge=traced.dynamic_batch)
    params_before, bytes_before = count_params(pristine), count_bytes(pristine)
    before = {str(n.target): list(get_tensor(pristine, str(n.target)).shape) for n in _attrs(pristine)}
    holders = [pristine] + ([model] if isinstance(model, nn.Module) and model is not pristine else [])
    release = DenseRelease(holders) if release_source else None
    try:
        done = _slim_verified(pristine, reference, merge, fold_constants, rtol, counts, release)
    finally:
        if release is not None:
            release.close()
    if release is not None and len(holders) > 1:
        for sub in model.modules():
            _sync_attributes(sub)
    new, graph = done.new, done.analysis.graph
    layers = [
        LayerReport(name, shape, list(new[name].shape)) for name, shape in before.items() if new[name].dim()
    ]
    unreadable = list(done.pinned.values()) + graph.unreadable
    report = SlimReport(
        _report_spaces(done.analysis),
        layers,
        graph.unsupported,
        done.check,
        sorted(done.excluded),
        unreadable,
    )
    return SlimResult(
        model=done.gm,
        report=report,
        params_before=params_before,
        params_after=count_params(done.gm),
        flops_before=reference.flops,
        flops_after=done.flops,
        bytes_before=bytes_before,
        bytes_after=count_bytes(done.gm),
        dynamic_batch=traced.dynamic_batch,
        _new_tensors=new,
    )


def _attrs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "get_attr"]


@dataclass
class _Verified:
    gm: torch.fx.GraphModule
    analysis: _Analysis
    new: dict[str, torch.Tensor]
    check: Verification
    flops: int
    excluded: set[str]
    pinned: dict[str, Unreadable]


def _slim_verified(
    pristine: torch.fx.GraphModule,
    reference: Reference,
    merge: bool,
    fold: bool,
    rtol: float,
    counts: _Counts,
    release: DenseRelease | None,
) -> _Verified:
    """Rewrite and verify, keeping in place the spaces that do not verify (up to 4 rounds)."""
    excluded: set[str] = set()
    pinned: dict[str, Unreadable] = {}  # nodes whose sizes the rewrite could not fix
    for _attempt in range(4):
        gm, analysis, new = _rewrite_copy(pristine, merge, fold, excluded, counts, pinned, release)
        bound = verify_bound(rtol, lowest_precision(pristine, reference), accumulation_depth(analysis.graph))
        check, flops = check_against(reference, gm, bound)
        if check.passed:
            return _Verified(gm, analysis, new, check, flops, excluded, pinned)
        del gm, new
        if release is not None:
            release.restore()
        if check.error:
            log.warning("slim model failed to run (%s); looking for the spaces that cause it", check.error)
        culprits = _find_culprits(pristine, reference, merge, fold, excluded, analysis, bound, pinned)
        if not culprits:
            what = check.error or f"max rel diff {check.max_rel_diff:.3g}, bound {bound:.3g}: {check.reason}"
            raise VerificationError(
                f"slim model differs from its source ({what}); "
                "no single space explains it. Please report this model."
            )
        log.warning("spaces %s did not verify; keeping them in place", sorted(culprits))
        excluded |= culprits
    raise VerificationError(
        f"slim model does not verify even with spaces {sorted(excluded)} kept: {check.reason}"
    )


def _rewrite_copy(
    pristine: torch.fx.GraphModule,
    merge: bool,
    fold: bool,
    exclude: set[str],
    counts: _Counts,
    pinned: dict[str, Unreadable],
    release: Release | None = None,
) -> tuple[torch.fx.GraphModule, _Analysis, dict[str, torch.Tensor]]:
    """Analyse and rewrite a copy of `pristine` that shares its tensors. A node whose sizes the rewrite
    cannot fix is added to `pinned` and the copy is slimmed again with it pinned (each round pins at
    least one more node)."""
    while True:
        gm = shared_copy(pristine)
        reasons = {
            name: f"rewrite could not read {u.op} (node {name}): {u.reason}" for name, u in pinned.items()
        }
        analysis = _analyse(gm, merge, fold, exclude, counts, reasons)
        g, plan = analysis.graph, analysis.plan
        new = rewrite(g, plan, release) if release else rewrite(g, plan)
        failed = {
            u.node: u for u in analysis.graph.unreadable if u.stage == "rewrite" and u.node not in pinned
        }
        if not failed:
            return gm, analysis, new
        log.warning("rewrite could not read nodes %s; slimming again with them pinned", sorted(failed))
        pinned.update(failed)
        if release is not None:
            release.restore()


def _find_culprits(
    pristine: torch.fx.GraphModule,
    reference: Reference,
    merge: bool,
    fold: bool,
    excluded: set[str],
    analysis: _Analysis,
    bound: float,
    pinned: dict[str, Unreadable] | None = None,
) -> set[str]:
    """Slim one changed space at a time; those that fail alone (mismatch or run error) are the culprits."""
    changed = [s.name for s in _report_spaces(analysis) if s.removed or s.merged]
    culprits = set()
    for name in changed[:64]:
        others = {s for s in changed if s != name} | excluded
        gm, _, _ = _rewrite_copy(pristine, merge, fold, others, None, dict(pinned or {}))
        if not check_against(reference, gm, bound, n_batches=2)[0].passed:
            culprits.add(name)
    return culprits


# ---- groups for compression methods ----------------------------------------------------------
@dataclass
class ChannelGroup:
    """One removable channel: the parameter slices that produce it and the ones that read it."""

    space: str
    index: int
    produce: list[tuple[str, int, tuple[int, ...]]]  # (qualified name, dim, positions)
    consume: list[tuple[str, int, tuple[int, ...]]]
    stats: list[tuple[str, int, tuple[int, ...]]]  # variance buffers: never zeroed


@dataclass
class GroupSet:
    groups: list[ChannelGroup]
    by_space: dict[str, list[int]]  # space -> indices into groups
    pinned_spaces: dict[str, str]  # space -> reason it cannot be slimmed


def find_groups(model: nn.Module, example_inputs: Any) -> GroupSet:
    """The removable channel groups of `model`, found on its graph (names match `model`'s)."""
    traced = trace(model, as_input_tuple(example_inputs))
    g = build_channel_graph(traced.gm)
    named = spaces(g)
    groups: list[ChannelGroup] = []
    by_space: dict[str, list[int]] = defaultdict(list)
    pinned: dict[str, str] = {}
    seen: set[int] = set()
    for name, members in named.items():
        slices: dict[int, dict[str, list]] = defaultdict(lambda: {"produce": [], "consume": [], "stats": []})
        for node, d in members:
            comps = g.component[g.layouts[node][d]]
            role = (
                "consume"
                if (node, d) in g.consumer_dims
                else "stats"
                if (node, d) in g.stat_dims
                else "produce"
            )
            for comp in np.unique(comps):
                if not g.pinned[comp]:
                    positions = tuple(int(p) for p in np.flatnonzero(comps == comp))
                    slices[int(comp)][role].append((str(node.target), d, positions))
        _add_stats(g, slices)
        if not slices:
            comps = np.unique(np.concatenate([g.component[g.layouts[n][d]] for n, d in members]))
            pinned[name] = g.pin_reason.get(int(comps[0]), "pinned")
            continue
        for comp in sorted(
            slices,
            key=lambda c: min(p for _, _, ps in slices[c]["produce"] or slices[c]["consume"] for p in ps),
        ):
            if comp in seen or not slices[comp]["produce"]:
                continue
            seen.add(comp)
            by_space[name].append(len(groups))
            groups.append(ChannelGroup(name, len(by_space[name]) - 1, **slices[comp]))
    return GroupSet(groups, dict(by_space), pinned)


def _add_stats(g: ChannelGraph, slices: dict[int, dict[str, list]]) -> None:
    for node, d in g.stat_dims:
        comps = g.component[g.layouts[node][d]]
        for comp in np.unique(comps):
            if int(comp) in slices:
                positions = tuple(int(p) for p in np.flatnonzero(comps == comp))
                entry = (str(node.target), d, positions)
                if entry not in slices[int(comp)]["stats"]:
                    slices[int(comp)]["stats"].append(entry)


@torch.no_grad()
def zero_group(model: nn.Module, group: ChannelGroup) -> None:
    """Set every producing slice of `group` to exactly zero (variance buffers untouched)."""
    for name, dim, positions in group.produce:
        t = get_tensor(model, name)
        t[slice_index(dim, positions, t.dim())] = 0


def group_signature(group: ChannelGroup) -> tuple[tuple[str, int, int], ...]:
    """(tensor, dim, slice width) of each producing slice and statistic: groups with the same
    signature can be copied onto each other (a concat's branches have different producers)."""
    return tuple((name, dim, len(positions)) for name, dim, positions in group.produce + group.stats)


@torch.no_grad()
def copy_group(model: nn.Module, source: ChannelGroup, target: ChannelGroup) -> None:
    """Make `target`'s producing slices (and statistics) equal to `source`'s."""
    if group_signature(source) != group_signature(target):
        raise SlimmingError(
            f"cannot copy group {source.space}#{source.index} onto {target.space}#{target.index}: they are "
            "produced by different tensors (for example two branches of a concat); pick a group with the "
            "same group_signature"
        )
    for (name, dim, src), (_, _, dst) in zip(
        source.produce + source.stats, target.produce + target.stats, strict=True
    ):
        t = get_tensor(model, name)
        t[slice_index(dim, dst, t.dim())] = t[slice_index(dim, src, t.dim())].clone()


@torch.no_grad()
def zero_random_groups(model: nn.Module, example_inputs: Any, fraction: float = 0.3, seed: int = 0) -> int:
    """Zero, in place, a random `fraction` of the groups `slim` would remove; return channels zeroed."""
    if not 0 <= fraction < 1:
        raise SlimmingError(f"fraction must be in [0, 1), got {fraction}")
    inputs = as_input_tuple(example_inputs)
    found = find_groups(model, inputs)
    rng = random.Random(seed)
    zeroed = 0
    for indices in found.by_space.values():
        k = min(int(round(fraction * len(indices))), len(indices) - 1)
        for i in rng.sample(indices, k):
            zero_group(model, found.groups[i])
            zeroed += 1
    return zeroed


@torch.no_grad()
def make_random_identical(model: nn.Module, example_inputs: Any, fraction: float = 0.3, seed: int = 0) -> int:
    """Make random clusters of filters identical in place (as C-SGD ends); return channels that will merge."""
    if not 0 <= fraction < 1:
        raise SlimmingError(f"fraction must be in [0, 1), got {fraction}")
    inputs = as_input_tuple(example_inputs)
    found = find_groups(model, inputs)
    rng = random.Random(seed)
    merging = 0
    for indices in found.by_space.values():
        by_signature: dict[tuple, list[int]] = defaultdict(list)  # a concat's branches apart
        for i in indices:
            by_signature[group_signature(found.groups[i])].append(i)
        for members in by_signature.values():
            merging += _copy_random(model, found.groups, members, fraction, rng)
    return merging


def _copy_random(
    model: nn.Module, groups: list[ChannelGroup], indices: list[int], fraction: float, rng: random.Random
) -> int:
    """Copy random representatives onto a `fraction` of `indices` (groups of one signature)."""
    k = min(int(round(fraction * len(indices))), len(indices) - 1)
    if k <= 0:
        return 0
    order = rng.sample(indices, len(indices))
    reps, members = order[: len(order) - k], order[len(order) - k :]
    for member in members:
        copy_group(model, groups[rng.choice(reps)], groups[member])
    return len(members)
