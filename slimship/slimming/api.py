"""Public entry points: `slim`, `find_groups`, `zero_random_groups`, `make_random_identical`."""

from __future__ import annotations

import copy
import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimship.compare import compare
from slimship.errors import SlimmingError, VerificationError
from slimship.slimming.graph import ChannelGraph, Unreadable, get_tensor, slice_index
from slimship.slimming.plan import Plan, make_plan, spaces
from slimship.slimming.rewrite import rewrite
from slimship.slimming.rules import build_channel_graph
from slimship.slimming.trace import as_input_tuple, trace
from slimship.slimming.values import ValueAnalysis

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
class Verification:
    max_abs_diff: float
    max_rel_diff: float
    tolerance: float
    inputs_checked: int
    passed: bool
    reason: str = ""  # why it failed: batch, output, kind of mismatch, first index
    error: str | None = None  # the slim model failed to run (a failed verification, like a mismatch)


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


def random_like_inputs(inputs: tuple[Any, ...], generator: torch.Generator) -> tuple[Any, ...]:
    """Fresh inputs of the same shapes: floats ~ N(mean, std) of the example, ints in its range."""
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif x.is_floating_point():
            std = float(x.std()) if x.numel() > 1 else 1.0
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            out.append(noise * (std or 1.0) + float(x.mean()))
        elif x.dtype == torch.bool:
            out.append(x.clone())
        else:
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, x.shape, generator=generator, dtype=x.dtype))
    return tuple(out)


def _flat_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _flat_outputs(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_outputs(v)]
    if hasattr(value, "to_tuple"):
        return _flat_outputs(value.to_tuple())
    return []


VERIFY_SCALE_FLOOR = 1e-8  # slimming is exact: its bound is relative to the outputs, not to max(1, ...)


def verify_outputs(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: tuple[Any, ...],
    rtol: float = 1e-5,
    n_random: int = 2,
    seed: int = 0,
    what: str = "slim model",
) -> Verification:
    """Compare outputs on the example inputs and `n_random` random inputs with `slimship.compare`.

    Per batch, max|diff| must be <= rtol * max|finite reference| (relative to the outputs however small,
    floored at 1e-8), NaN/Inf must match in place and sign, integer outputs exactly. Returns the worst
    figures; `passed` is False (with `reason`) on the first batch that fails.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = [example_inputs] + [random_like_inputs(example_inputs, generator) for _ in range(n_random)]
    worst_abs = worst_rel = 0.0
    reason = ""
    with torch.no_grad():
        for n, inputs in enumerate(batches):
            ref = _flat_outputs(reference(*inputs))
            got = _flat_outputs(candidate(*inputs))
            result = compare(ref, got, rtol, floor=VERIFY_SCALE_FLOOR)
            worst_abs, worst_rel = max(worst_abs, result.max_abs_diff), max(worst_rel, result.max_rel_diff)
            if not result.passed and not reason:
                batch = "example inputs" if n == 0 else f"random inputs {n}"
                reason = f"{what} on {batch}: {result.reason}"
    return Verification(worst_abs, worst_rel, rtol, len(batches), not reason, reason)


# ---- slimming --------------------------------------------------------------------------------
@dataclass
class _Analysis:
    graph: ChannelGraph
    values: ValueAnalysis
    plan: Plan
    spaces: dict[str, list]


def check_outputs(
    reference: nn.Module, candidate: nn.Module, example_inputs: tuple[Any, ...], **options: Any
) -> Verification:
    """`verify_outputs`, where a candidate that fails to run (or changes an output's shape) is a
    failed verification instead of an exception."""
    try:
        return verify_outputs(reference, candidate, example_inputs, **options)
    except Exception as exc:  # a rewritten graph that does not run is as wrong as a numeric mismatch
        cause = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        rtol = options.get("rtol", 1e-5)
        return Verification(float("inf"), float("inf"), rtol, 0, False, reason=cause, error=cause)


def _analyse(
    gm: torch.fx.GraphModule,
    merge: bool,
    fold: bool,
    exclude: set[str],
    channel_multiple: int | None = None,
    unreadable: dict[str, str] | None = None,
) -> _Analysis:
    g = build_channel_graph(gm, unreadable)
    va = ValueAnalysis(g)
    plan = make_plan(g, va, merge=merge, fold=fold)
    named = spaces(g)
    for name in exclude:
        for node, d in named.get(name, []):
            comps = np.unique(g.component[g.layouts[node][d]])
            _keep(plan, comps, "kept in place: slimming this space did not verify")
    if channel_multiple and channel_multiple > 1:
        _align(g, plan, named, channel_multiple)
    return _Analysis(g, va, plan, named)


def _align(g: ChannelGraph, plan: Plan, named: dict[str, list], multiple: int) -> None:
    """Round each space's kept channels up to a multiple the target's kernels favour."""
    for members in named.values():
        comps = np.unique(np.concatenate([g.component[g.layouts[n][d]] for n, d in members]))
        dropped = [int(c) for c in comps if not plan.keep[c]]
        if not dropped:
            continue
        need = (-(len(comps) - len(dropped))) % multiple
        _keep(
            plan,
            np.array(dropped[:need], dtype=np.int64),
            f"kept for channel alignment (multiple of {multiple})",
        )


def _keep(plan: Plan, comps: np.ndarray, reason: str) -> None:
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
) -> SlimResult:
    """Remove zero-invariant channel groups and merge identical ones; verify the result numerically.

    Returns a SlimResult whose `.model` is a GraphModule with the source's parameter names. A space
    whose rewrite does not verify is kept in place (named in `report.excluded_spaces`); if the model
    still does not match, a VerificationError is raised. `channel_multiple` rounds every space's kept
    channels up to that multiple (see `slimship.runtimes.measure_alignment` for a target's value).
    """
    inputs = as_input_tuple(example_inputs)
    traced = trace(model, inputs, dynamic_batch=dynamic_batch)
    pristine = traced.gm
    reference = copy.deepcopy(pristine)
    flops_before = count_flops(reference, inputs)
    excluded: set[str] = set()
    pinned: dict[str, Unreadable] = {}  # nodes whose sizes the rewrite could not fix
    for _attempt in range(4):
        gm, analysis, new = _rewrite_copy(pristine, merge, fold_constants, excluded, channel_multiple, pinned)
        before = {name: list(get_tensor(pristine, name).shape) for name in new}
        check = check_outputs(reference, gm, inputs, rtol=rtol, n_random=n_random, seed=seed)
        if check.passed:
            break
        if check.error:
            log.warning("slim model failed to run (%s); looking for the spaces that cause it", check.error)
        culprits = _find_culprits(
            pristine, reference, inputs, merge, fold_constants, excluded, analysis, rtol, seed, pinned
        )
        if not culprits:
            what = check.error or f"max rel diff {check.max_rel_diff:.3g}, bound {rtol}: {check.reason}"
            raise VerificationError(
                f"slim model differs from its source ({what}); "
                "no single space explains it. Please report this model."
            )
        log.warning("spaces %s did not verify; keeping them in place", sorted(culprits))
        excluded |= culprits
    else:
        raise VerificationError(
            f"slim model does not verify even with spaces {sorted(excluded)} kept: {check.reason}"
        )
    layers = [
        LayerReport(name, shape, list(new[name].shape))
        for name, shape in before.items()
        if new[name].dim() > 0
    ]
    unreadable = list(pinned.values()) + analysis.graph.unreadable
    report = SlimReport(
        _report_spaces(analysis), layers, analysis.graph.unsupported, check, sorted(excluded), unreadable
    )
    return SlimResult(
        model=gm,
        report=report,
        params_before=count_params(reference),
        params_after=count_params(gm),
        flops_before=flops_before,
        flops_after=count_flops(gm, inputs),
        bytes_before=count_bytes(reference),
        bytes_after=count_bytes(gm),
        dynamic_batch=traced.dynamic_batch,
        _new_tensors=new,
    )


def _rewrite_copy(
    pristine: torch.fx.GraphModule,
    merge: bool,
    fold: bool,
    exclude: set[str],
    channel_multiple: int | None,
    pinned: dict[str, Unreadable],
) -> tuple[torch.fx.GraphModule, _Analysis, dict[str, torch.Tensor]]:
    """Analyse and rewrite a copy of `pristine`. A node whose sizes the rewrite cannot fix is added to
    `pinned` and the copy is slimmed again with it pinned (each round pins at least one more node)."""
    while True:
        gm = copy.deepcopy(pristine)
        reasons = {
            name: f"rewrite could not read {u.op} (node {name}): {u.reason}" for name, u in pinned.items()
        }
        analysis = _analyse(gm, merge, fold, exclude, channel_multiple, reasons)
        new = rewrite(analysis.graph, analysis.plan)
        failed = {
            u.node: u for u in analysis.graph.unreadable if u.stage == "rewrite" and u.node not in pinned
        }
        if not failed:
            return gm, analysis, new
        log.warning("rewrite could not read nodes %s; slimming again with them pinned", sorted(failed))
        pinned.update(failed)


def _find_culprits(
    pristine, reference, inputs, merge, fold, excluded, analysis, rtol, seed, pinned=None
) -> set[str]:
    """Slim one changed space at a time; those that fail alone (mismatch or run error) are the culprits."""
    changed = [s.name for s in _report_spaces(analysis) if s.removed or s.merged]
    culprits = set()
    for name in changed[:64]:
        others = {s for s in changed if s != name} | excluded
        gm, _, _ = _rewrite_copy(pristine, merge, fold, others, None, dict(pinned or {}))
        if not check_outputs(reference, gm, inputs, rtol=rtol, n_random=1, seed=seed).passed:
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
