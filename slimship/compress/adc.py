"""ADC / AMC: a DDPG agent chooses how much of each channel space to keep, under a FLOPs or latency budget.

The agent walks the prunable channel spaces ``find_groups`` finds, one step per space. Its state
describes the space (position, op kind, channels, kernel size, FLOPs, FLOPs already removed, FLOPs still
left, previous action); its action is the fraction of the space's groups to keep. An episode zeroes the
least important groups per space, scores the pruned network on a validation split held back from the
training data (no fine-tuning) and uses that accuracy as reward. The budget is enforced in the action,
as in AMC: each action is clipped so that the budget stays reachable with later spaces at the minimum.

A latency budget uses a per-space latency table measured once on the target runtime (each space slimmed
to a few kept fractions, exported and timed; linear interpolation in between). The policy found is
checked on the measured latency of the slimmed model and, if the additive table was optimistic, the
budget is tightened until the measurement meets it.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from torch import nn

from slimship.compress.base import (
    Batch,
    CompressResult,
    GroupTensors,
    _progress,
    load_checkpoint,
    make_optimizer,
    maybe_accuracy,
    prunable_groups,
    register,
    save_checkpoint,
    train_loop,
    working_copy,
)
from slimship.errors import CompressionError
from slimship.runtimes.registry import RUNTIME_NAMES
from slimship.slimming.api import ChannelGroup, count_flops
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)

_KINDS = {nn.Conv1d: 1.0, nn.Conv2d: 1.0, nn.Conv3d: 1.0, nn.Linear: 0.0}
IMPORTANCES = ("magnitude", "taylor")
SEARCHES = ("ddpg", "uniform")
RUNTIMES = RUNTIME_NAMES  # the registry's runtimes (slimship.runtimes.registry)


# ---- data ------------------------------------------------------------------------------------------
def split_validation(train: Iterable[Batch], fraction: float, seed: int) -> tuple[list[Batch], list[Batch]]:
    """Hold back `fraction` of one pass over `train` (deterministic under `seed`): (rest, validation)."""
    if hasattr(train, "set_epoch"):
        train.set_epoch(0)
    xs, ys = zip(*list(train), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(fraction * len(x)))
    val, rest = order[:n_val], order[n_val:]
    return [(x[rest], y[rest])], [(x[val], y[val])]


# ---- cost models -----------------------------------------------------------------------------------
@dataclass
class Space:
    """One step of the agent: a prunable channel space."""

    name: str
    groups: list[int]  # indices into the GroupSet
    kind: float  # 1 conv, 0 linear
    kernel: int
    flops: float  # dense FLOPs of the layers that produce or read it

    @property
    def n(self) -> int:
        return len(self.groups)


@dataclass
class FlopsModel:
    """FLOPs as a function of kept fractions: each conv/linear scales with its out- and in-space."""

    total: float
    fixed: float  # FLOPs that no prunable space touches
    layers: list[tuple[float, int | None, int | None]]  # (dense FLOPs, out space, in space)

    def flops(self, fractions: Sequence[float]) -> float:
        out = self.fixed
        for f, s_out, s_in in self.layers:
            out += (
                f * (1.0 if s_out is None else fractions[s_out]) * (1.0 if s_in is None else fractions[s_in])
            )
        return out


def _layer_flops(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, float]:
    """FLOPs of every conv / linear module on `inputs` (2 per multiply-add), keyed by module name."""
    flops: dict[str, float] = {}
    handles = []

    def hook(name: str, per_output: float):
        def fn(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            flops[name] = 2.0 * out.numel() * per_output

        return fn

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fn = hook(name, m.in_features)
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            fn = hook(name, m.weight.shape[1] * math.prod(m.weight.shape[2:]))
        else:
            continue
        handles.append(m.register_forward_hook(fn))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return flops


def build_spaces(
    model: nn.Module, inputs: tuple[Any, ...], groups: list[ChannelGroup], by_space: dict[str, list[int]]
) -> tuple[list[Space], FlopsModel]:
    """The agent's steps (in graph order) and the FLOPs model of `model`."""
    names = list(by_space)
    position = {s: i for i, s in enumerate(names)}
    out_space: dict[str, int] = {}
    in_space: dict[str, int] = {}
    for s in names:
        g = groups[by_space[s][0]]
        for pname, dim, _ in g.produce:
            if pname.endswith(".weight") and dim == 0:
                out_space.setdefault(pname[: -len(".weight")], position[s])
        for pname, dim, _ in g.consume:
            if pname.endswith(".weight") and dim == 1:
                in_space.setdefault(pname[: -len(".weight")], position[s])
    layer_flops = _layer_flops(model, inputs)
    total = float(count_flops(model, inputs))
    layers = [(f, out_space.get(n), in_space.get(n)) for n, f in layer_flops.items()]
    fixed = max(total - sum(f for f, _, _ in layers), 0.0)
    spaces = []
    modules = dict(model.named_modules())
    for s in names:
        i = position[s]
        producers = [n for n, j in out_space.items() if j == i and n in modules]
        first = modules[producers[0]] if producers else None
        kind = next((v for cls, v in _KINDS.items() if isinstance(first, cls)), 0.5)
        kernel = int(math.prod(first.weight.shape[2:])) if first is not None and first.weight.dim() > 2 else 1
        touched = sum(f for f, o, n_in in layers if i in (o, n_in))
        spaces.append(Space(s, list(by_space[s]), kind, kernel, touched))
    return spaces, FlopsModel(total, fixed, layers)


@dataclass
class LatencyTable:
    """Per-space measured latency at a few kept fractions; a candidate's latency is additive over spaces."""

    runtime: str
    threads: int
    dense_ms: float
    min_ms: float  # every space at its minimum (measured)
    points: dict[str, list[tuple[float, float]]]  # space -> [(kept fraction, ms)] ascending

    def delta(self, space: str, fraction: float) -> float:
        pts = self.points[space]
        xs = [p[0] for p in pts] + [1.0]
        ys = [p[1] for p in pts] + [self.dense_ms]
        return float(np.interp(fraction, xs, ys)) - self.dense_ms

    def latency(self, names: Sequence[str], fractions: Sequence[float]) -> float:
        additive = self.dense_ms + sum(self.delta(s, f) for s, f in zip(names, fractions, strict=True))
        return max(additive, self.min_ms)  # never below the measured latency with every space at minimum


# ---- latency measurement ---------------------------------------------------------------------------
def measure_latency_ms(
    model: nn.Module,
    inputs: Any,
    runtime: str = "onnxruntime",
    threads: int = 1,
    runs: int = 60,
    repeats: int = 1,
) -> float:
    """Latency (ms) of `model` exported for `runtime` (the registry's fp32 format it opens, parity checked
    by the exporter) and timed by `slimship.runtimes` in a runner process with `threads` threads.

    The median of `runs` timed runs; with `repeats` > 1, the smallest of that many such medians (load
    from other processes only ever adds time, so the minimum is the robust estimate on a shared machine).
    """
    from slimship.exporters.registry import ExportRequest, format_for_runtime
    from slimship.runtimes.measure import median_latencies_ms
    from slimship.runtimes.targets import Target

    if runtime not in RUNTIMES:
        raise CompressionError(f"option 'target_runtime' must be one of {RUNTIMES}, got {runtime!r}")
    inputs = as_input_tuple(inputs)
    record = format_for_runtime(runtime)
    target = Target(f"adc-{runtime}-{threads}t", threads=threads, runtime=runtime)
    with tempfile.TemporaryDirectory(prefix="slimship-adc-") as tmp:
        path = Path(tmp) / record.file_name("candidate")
        record.export(ExportRequest(model.eval(), inputs, inputs, dynamic_batch=False), path)
        arrays = [t.detach().numpy() for t in inputs]
        return median_latencies_ms([path], arrays, target, warmup=10, runs=runs, repeats=repeats)[0]


# ---- policies --------------------------------------------------------------------------------------
class Pruner:
    """Applies kept counts per space to a model by zeroing each space's least important groups."""

    def __init__(
        self, model: nn.Module, groups: list[ChannelGroup], spaces: list[Space], scores: torch.Tensor
    ):
        self.model = model
        self.tensors = GroupTensors(model, groups)
        self.order = [sorted(s.groups, key=lambda i: (float(scores[i]), i)) for s in spaces]
        self.dense = copy.deepcopy(model.state_dict())

    def pruned(self, counts: Sequence[int]) -> list[int]:
        """Indices of the groups removed under `counts` (least important first in each space)."""
        out = []
        for order, c in zip(self.order, counts, strict=True):
            out += order[: len(order) - c]
        return out

    def apply(self, counts: Sequence[int]) -> list[int]:
        self.model.load_state_dict(self.dense)
        removed = self.pruned(counts)
        for i in removed:
            self.tensors.zero(i)
        return removed


def importance_scores(
    model: nn.Module, groups: list[ChannelGroup], kind: str, batches: list[Batch]
) -> torch.Tensor:
    """Per group: L2 norm of its weights (magnitude) or |sum(w * dL/dw)| summed over batches (Taylor)."""
    tensors = GroupTensors(model, groups)
    if kind == "magnitude":
        return tensors.norms()
    if kind != "taylor":
        raise CompressionError(f"option 'importance' must be one of {IMPORTANCES}, got {kind!r}")
    model.eval()
    scores = torch.zeros(len(groups), dtype=torch.float64)
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for i in range(len(groups)):
            scores[i] += float((tensors.vector(i) * tensors.vector(i, grad=True)).sum().abs())
    model.zero_grad(set_to_none=True)
    return scores


class Budget:
    """Cost of kept counts (FLOPs or predicted ms) and the clip that keeps the budget reachable."""

    def __init__(
        self, spaces: list[Space], cost: Callable[[list[float]], float], limit: float, min_keep: float
    ):
        self.spaces, self.cost, self.limit = spaces, cost, limit
        self.min_counts = [max(1, round(min_keep * s.n)) for s in spaces]

    def fractions(self, counts: Sequence[int]) -> list[float]:
        return [c / s.n for c, s in zip(counts, self.spaces, strict=True)]

    def clip(self, t: int, counts: list[int], wanted: int) -> int:
        """Largest count <= `wanted` at step t so the budget holds with later spaces at their minimum."""
        trial = [*list(counts[:t]), wanted, *self.min_counts[t + 1 :]]
        c = wanted
        while c > self.min_counts[t]:
            trial[t] = c
            if self.cost(self.fractions(trial)) <= self.limit * (1 + 1e-9):
                break
            c -= 1
        return max(c, self.min_counts[t])


#: maps kept counts to counts the target runs well (identity: `list`)
Snap = Callable[[list[int]], list[int]]


# ---- DDPG ------------------------------------------------------------------------------------------
def _mlp(n_in: int, hidden: int, out_act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, 1))
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class DDPG:
    """The search agent's settings: exploration (random warm-up episodes, then truncated-normal noise of
    width `sigma`, decayed per episode), networks, learning rates, soft-update rate, replay."""

    warmup_episodes: int = 40
    sigma: float = 0.5
    sigma_decay: float = 0.97
    hidden: int = 64
    lr_actor: float = 1e-3
    lr_critic: float = 1e-3
    tau: float = 0.01
    gamma: float = 1.0
    batch_size: int = 64
    updates_per_step: int = 4
    buffer_size: int = 4000


class Agent:
    """Actor-critic with target networks (soft updates) and a replay buffer, all in plain torch."""

    STATE = 8

    def __init__(self, ddpg: DDPG) -> None:
        self.actor = _mlp(self.STATE, ddpg.hidden, nn.Sigmoid())
        self.critic = _mlp(self.STATE + 1, ddpg.hidden, None)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.opt_actor = torch.optim.Adam(self.actor.parameters(), lr=ddpg.lr_actor)
        self.opt_critic = torch.optim.Adam(self.critic.parameters(), lr=ddpg.lr_critic)
        self.tau, self.gamma, self.capacity = ddpg.tau, ddpg.gamma, ddpg.buffer_size
        self.buffer: list[list[float]] = []  # rows: state, action, reward, next state, done

    def act(self, state: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0, 0])

    def remember(self, row: list[float]) -> None:
        self.buffer.append(row)
        if len(self.buffer) > self.capacity:
            self.buffer.pop(0)

    def update(self, rng: np.random.Generator, batch_size: int) -> None:
        take = rng.integers(0, len(self.buffer), size=min(batch_size, len(self.buffer)))
        rows = torch.tensor([self.buffer[i] for i in take], dtype=torch.float32)
        k = self.STATE
        s, a, r, s2, done = (
            rows[:, :k],
            rows[:, k : k + 1],
            rows[:, k + 1 : k + 2],
            rows[:, k + 2 : -1],
            rows[:, -1:],
        )
        with torch.no_grad():
            q_next = self.critic_target(torch.cat([s2, self.actor_target(s2)], 1))
            target = r + self.gamma * (1 - done) * q_next
        critic_loss = F.mse_loss(self.critic(torch.cat([s, a], 1)), target)
        self.opt_critic.zero_grad()
        critic_loss.backward()
        self.opt_critic.step()
        actor_loss = -self.critic(torch.cat([s, self.actor(s)], 1)).mean()
        self.opt_actor.zero_grad()
        actor_loss.backward()
        self.opt_actor.step()
        for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
            with torch.no_grad():
                for p, q in zip(net.parameters(), tgt.parameters(), strict=True):
                    q.mul_(1 - self.tau).add_(p, alpha=self.tau)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: getattr(self, name).state_dict()
            for name in ("actor", "critic", "actor_target", "critic_target", "opt_actor", "opt_critic")
        } | {"buffer": torch.tensor(self.buffer, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("actor", "critic", "actor_target", "critic_target", "opt_actor", "opt_critic"):
            getattr(self, name).load_state_dict(state[name])
        self.buffer = state["buffer"].tolist()


def _states(spaces: list[Space], flops: FlopsModel, counts: list[int], t: int, prev: float) -> np.ndarray:
    """The AMC state of step t, every feature scaled to about [0, 1]."""
    n_max = max(s.n for s in spaces)
    k_max = max(s.kernel for s in spaces)
    fr = [c / s.n for c, s in zip(counts, spaces, strict=True)]
    now = flops.flops(fr)
    rest = sum(f for f, o, i in flops.layers if (o is not None and o >= t) or (i is not None and i >= t))
    s = spaces[t]
    return np.array(
        [
            t / max(len(spaces) - 1, 1),
            s.kind,
            s.n / n_max,
            s.kernel / k_max,
            s.flops / flops.total,
            (flops.total - now) / flops.total,
            rest / flops.total,
            prev,
        ],
        dtype=np.float32,
    )


@dataclass
class SearchState:
    episode: int = 0
    sigma: float = 0.5
    baseline: float | None = None
    best_reward: float = -1.0
    best_counts: list[int] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)


def _truncated(rng: np.random.Generator, mu: float, sigma: float, lo: float, hi: float) -> float:
    if sigma <= 0:
        return float(np.clip(mu, lo, hi))
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    return float(truncnorm.rvs(a, b, loc=mu, scale=sigma, random_state=rng))


# ---- the method ------------------------------------------------------------------------------------
@register("adc")
def adc(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    target_flops_ratio: float | None = 0.25,
    target_latency_ms: float | None = None,
    target_runtime: str = "onnxruntime",
    target_threads: int = 1,
    latency_fractions: Sequence[float] = (0.25, 0.5, 0.75),
    latency_runs: int = 60,
    search: str = "ddpg",
    episodes: int = 200,
    warmup_episodes: int = 40,
    min_keep: float = 0.1,
    max_keep: float = 1.0,
    importance: str = "magnitude",
    recalibrate_bn: int = 4,
    seed_uniform: bool = True,
    top_k: int = 4,
    select_epochs: int = 1,
    latency_margin: float = 0.05,
    latency_rounds: int = 6,
    latency_repeats: int = 3,
    latency_fill: bool = True,
    latency_multiple: int | None = None,
    val_fraction: float = 0.2,
    sigma: float = 0.5,
    sigma_decay: float = 0.97,
    hidden: int = 64,
    lr_actor: float = 1e-3,
    lr_critic: float = 1e-3,
    tau: float = 0.01,
    gamma: float = 1.0,
    batch_size: int = 64,
    updates_per_step: int = 4,
    buffer_size: int = 4000,
    finetune_epochs: int = 5,
    lr: float = 0.01,
    checkpoint: str | Path | None = None,
    seed: int = 0,
) -> CompressResult:
    """Search per-space keep ratios with DDPG under a FLOPs (or latency) budget, prune, fine-tune.

    Selection: the `top_k` distinct policies of highest search reward (the uniform policy among them when
    `seed_uniform`) are each fine-tuned for `select_epochs` on the training part and scored on the
    validation split; the best one wins (``select_epochs=0``: the highest reward wins). Latency budget:
    the chosen policy is slimmed and measured on the target; while it is over ``(1 - latency_margin) x``
    the budget, the latency model is rescaled by measured/predicted and the policy shrunk, for at most
    `latency_rounds` measurements (each the smallest of `latency_repeats` medians), after which a
    CompressionError names the target. With `latency_fill`, a policy measured well under the goal is grown
    towards it in the remaining rounds (the largest policy measured within the goal is kept). With
    `latency_multiple`, every policy the loop measures keeps multiples of it per space (the channel multiple
    the target's kernels favour, see ``slimship.runtimes.measure_alignment``): unaligned counts can fall
    off a runtime's fast kernels, which no per-space latency table predicts.
    """
    if train is None:
        raise CompressionError(
            "adc needs training data (train batches) for its validation split and fine-tuning"
        )
    if search not in SEARCHES:
        raise CompressionError(f"option 'search' must be one of {SEARCHES}, got {search!r}")
    if not 0 < min_keep <= max_keep <= 1:
        raise CompressionError(f"options need 0 < min_keep <= max_keep <= 1, got {min_keep}, {max_keep}")
    if top_k < 1 or select_epochs < 0 or latency_rounds < 1 or not 0 <= latency_margin < 1:
        raise CompressionError(
            "options need top_k >= 1, select_epochs >= 0, latency_rounds >= 1 and 0 <= latency_margin < 1, "
            f"got {top_k}, {select_epochs}, {latency_rounds}, {latency_margin}"
        )
    inputs = as_input_tuple(example_inputs)
    model = working_copy(model).eval()
    found, by_space = prunable_groups(model, inputs)
    spaces, flops = build_spaces(model, inputs, found.groups, by_space)
    rest, val = split_validation(train, val_fraction, seed)
    scores = importance_scores(model, found.groups, importance, rest[:1])
    pruner = Pruner(model, found.groups, spaces, scores)
    names = [s.name for s in spaces]
    info: dict[str, Any] = {"spaces": names, "importance": importance, "search": search}

    if target_latency_ms is not None:
        minimum = [max(1, round(min_keep * s.n)) for s in spaces]
        min_ms = _slim_latency(pruner, minimum, inputs, target_runtime, target_threads, latency_runs)
        if min_ms > target_latency_ms:
            raise CompressionError(
                f"latency budget target_latency_ms={target_latency_ms} on target runtime "
                f"{target_runtime!r} ({target_threads} thread(s)) cannot be reached: the best achievable "
                f"latency, every space at min_keep={min_keep}, is {min_ms:.4f} ms; "
                "raise the budget or lower min_keep"
            )
        table = build_latency_table(
            pruner,
            spaces,
            inputs,
            target_runtime,
            target_threads,
            (min_keep, *latency_fractions),
            latency_runs,
            min_ms,
        )
        budget = Budget(spaces, lambda fr: table.latency(names, fr), target_latency_ms, min_keep)
        info["latency_table"] = table
        info["budget"] = {"kind": "latency_ms", "target": target_latency_ms, "runtime": target_runtime}
    else:
        if target_flops_ratio is None or not 0 < target_flops_ratio <= 1:
            raise CompressionError(
                f"option 'target_flops_ratio' must be in (0, 1], got {target_flops_ratio!r}"
            )
        budget = Budget(spaces, flops.flops, target_flops_ratio * flops.total, min_keep)
        info["budget"] = {"kind": "flops_ratio", "target": target_flops_ratio}
        best = flops.flops(budget.fractions(budget.min_counts)) / flops.total
        if best > target_flops_ratio:
            raise CompressionError(
                f"FLOPs budget target_flops_ratio={target_flops_ratio} cannot be reached: with every "
                f"space at min_keep={min_keep} the model keeps {best:.3f} of its FLOPs; "
                "lower min_keep or raise the target"
            )

    calib = [(x[i : i + 64], y[i : i + 64]) for x, y in rest for i in range(0, 64 * recalibrate_bn, 64)]

    def score(counts: list[int]) -> float:
        removed = pruner.apply(counts)
        recalibrate_batchnorm(model, calib, pruner.tensors, removed)
        return float(maybe_accuracy(model, val)) / 100.0

    uniform = uniform_counts(spaces, budget, max_keep)
    incumbent = (uniform, score(uniform)) if seed_uniform or search == "uniform" else None
    if search == "uniform":
        state = SearchState(best_counts=uniform, best_reward=incumbent[1])
    else:
        ddpg = DDPG(
            warmup_episodes=warmup_episodes,
            sigma=sigma,
            sigma_decay=sigma_decay,
            hidden=hidden,
            lr_actor=lr_actor,
            lr_critic=lr_critic,
            tau=tau,
            gamma=gamma,
            batch_size=batch_size,
            updates_per_step=updates_per_step,
            buffer_size=buffer_size,
        )
        state = _search(spaces, flops, budget, score, episodes, ddpg, (min_keep, max_keep), checkpoint, seed,
                        incumbent)  # fmt: skip
    candidates = top_policies(state.curve, incumbent, top_k)
    counts, selection = candidates[0]["counts"], []
    if select_epochs > 0 and len(candidates) > 1:
        tune = _training_batches(rest, getattr(train, "batch_size", 64), seed)

        def select_score(c: list[int]) -> dict[str, float]:
            removed = pruner.apply(c)
            recalibrate_batchnorm(model, calib, pruner.tensors, removed)
            _finetune(model, pruner.tensors, removed, tune, select_epochs, lr, seed)
            return validation_scores(model, val)

        counts, selection = select_policy(candidates, select_score)
    info["selection"] = selection
    if target_latency_ms is not None:
        where = f"target runtime {target_runtime!r} ({target_threads} thread(s))"

        def measure(c: list[int]) -> float:
            return _slim_latency(
                pruner, c, inputs, target_runtime, target_threads, latency_runs, latency_repeats
            )

        counts, checks = close_latency_loop(
            budget,
            counts,
            measure,
            latency_margin,
            latency_rounds,
            f"target_latency_ms={target_latency_ms}",
            where,
            [max(1, math.floor(max_keep * s.n)) for s in spaces] if latency_fill else None,
            (lambda c: aligned_counts(c, spaces, latency_multiple)) if latency_multiple else list,
        )
        info["latency_checks"] = checks
        chosen = next(c for c in checks if c["chosen"])
        info["predicted_latency_ms"] = chosen["predicted_ms"]
        info["measured_latency_ms"] = chosen["measured_ms"]
    info["search_val_accuracy"] = 100.0 * score(counts)  # leaves the policy applied, BN recalibrated
    removed = pruner.pruned(counts)
    history = _finetune(model, pruner.tensors, removed, train, finetune_epochs, lr, seed)
    fr = budget.fractions(counts)
    info.update(
        policy={s.name: f for s, f in zip(spaces, fr, strict=True)},
        kept_channels={s.name: [c, s.n] for s, c in zip(spaces, counts, strict=True)},
        reward_curve=[e["reward"] for e in state.curve],
        best_reward=state.best_reward,
        uniform_reward=None if incumbent is None else incumbent[1],
        episodes=state.curve,
        flops_ratio_predicted=flops.flops(fr) / flops.total,
        predicted_cost=budget.cost(fr),
        test_accuracy=maybe_accuracy(model, test),
    )
    return CompressResult(model=model, method="adc", history=history, info=info)


def uniform_counts(spaces: list[Space], budget: Budget, max_keep: float = 1.0) -> list[int]:
    """Kept counts as equal in fraction across spaces as the budget allows.

    The largest common fraction (on a fine grid) that meets the budget, then one channel at a time back
    to the space with the lowest kept fraction while the budget still holds (rounding in small spaces
    would otherwise leave part of the budget unused).
    """
    counts = list(budget.min_counts)
    for f in np.linspace(max_keep, 0.0, 401):
        trial = [max(m, min(s.n, round(f * s.n))) for s, m in zip(spaces, budget.min_counts, strict=True)]
        if budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
            counts = trial
            break
    cap = [max(1, math.floor(max_keep * s.n)) for s in spaces]
    while True:
        order = sorted(range(len(spaces)), key=lambda t: (counts[t] / spaces[t].n, t))
        for t in order:
            if counts[t] >= cap[t]:
                continue
            trial = list(counts)
            trial[t] += 1
            if budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
                counts = trial
                break
        else:
            return counts


def top_policies(
    curve: list[dict[str, Any]], incumbent: tuple[list[int], float] | None, k: int
) -> list[dict[str, Any]]:
    """The `k` distinct policies of highest reward (ties: earliest first); the incumbent always included."""
    seen: dict[tuple[int, ...], dict[str, Any]] = {}
    entries = list(curve)
    if incumbent is not None:
        entries.insert(0, {"episode": 0, "reward": incumbent[1], "counts": list(incumbent[0])})
    for e in entries:
        seen.setdefault(
            tuple(e["counts"]), {"episode": e["episode"], "reward": e["reward"], "counts": e["counts"]}
        )
    ranked = sorted(seen.values(), key=lambda e: (-e["reward"], e["episode"]))
    top = ranked[:k]
    if incumbent is not None and not any(e["episode"] == 0 for e in top):
        top[-1] = next(e for e in ranked if e["episode"] == 0)
    return [{**e, "counts": list(e["counts"])} for e in top]


def select_policy(
    candidates: list[dict[str, Any]], select_score: Callable[[list[int]], dict[str, float]]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Score every candidate after its short fine-tune on the validation split; the best wins.

    Highest validation accuracy wins; equal accuracies (frequent near 100 %) go to the lower validation
    loss, then to the higher search reward.
    """
    rows = [{**c, **select_score(list(c["counts"]))} for c in candidates]
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_accuracy"], -rows[i]["val_loss"], -i))
    for i, r in enumerate(rows):
        r["chosen"] = i == best
        log.info(
            "adc candidate (episode %d, reward %.4f): val accuracy %.2f after fine-tune%s",
            r["episode"],
            r["reward"],
            r["val_accuracy"],
            " (chosen)" if r["chosen"] else "",
        )
    return list(rows[best]["counts"]), rows


@torch.no_grad()
def validation_scores(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `batches`."""
    model.eval()
    correct = loss = count = 0.0
    for x, y in batches:
        out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += float((out.argmax(1) == y).sum())
        count += len(y)
    return {"val_accuracy": 100.0 * correct / max(count, 1), "val_loss": loss / max(count, 1)}


def _training_batches(rest: list[Batch], batch_size: int, seed: int) -> Any:
    """The training part (validation held back) as shuffled mini-batches."""
    from slimship.data import Batches

    x = torch.cat([b[0] for b in rest]).numpy()
    y = torch.cat([b[1] for b in rest]).numpy()
    return Batches(x, y, batch_size, shuffle=True, seed=seed)


def _search(
    spaces: list[Space],
    flops: FlopsModel,
    budget: Budget,
    score: Callable[[list[int]], float],
    episodes: int,
    ddpg: DDPG,
    keep: tuple[float, float],
    checkpoint: str | Path | None,
    seed: int,
    incumbent: tuple[list[int], float] | None = None,
) -> SearchState:
    """`episodes` DDPG episodes, one action (keep fraction in `keep`) per space, rewards from `score`."""
    min_keep, max_keep = keep
    torch.manual_seed(seed)
    agent = Agent(ddpg)
    rng = np.random.default_rng(seed)
    state = SearchState(sigma=ddpg.sigma)
    if incumbent is not None:
        # the uniform policy is the incumbent the agent has to beat: its reward is the first baseline and
        # its transitions seed the replay buffer as a demonstration episode
        counts, reward = list(incumbent[0]), incumbent[1]
        state.best_counts, state.best_reward, state.baseline = counts, reward, reward
        _remember_episode(agent, _episode_states(spaces, flops, counts), counts, spaces, 0.0)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        saved = load_checkpoint(path)
        agent.load_state_dict(saved["agent"])
        rng.bit_generator.state = _rng_from(saved["rng"])
        state = SearchState(**saved["search"])
        log.info("adc: resuming the search from %s at episode %d", path, state.episode)
    cache: dict[tuple[int, ...], float] = {}
    with _progress(f"adc search ({len(spaces)} spaces)", episodes) as advance:
        for _ in range(state.episode):
            advance()
        while state.episode < episodes:
            counts = [s.n for s in spaces]
            rows, prev = [], 1.0
            for t, s in enumerate(spaces):
                obs = _states(spaces, flops, counts, t, prev)
                if state.episode < ddpg.warmup_episodes:
                    a = float(rng.uniform(min_keep, max_keep))
                else:
                    a = _truncated(rng, agent.act(obs), state.sigma, min_keep, max_keep)
                wanted = max(budget.min_counts[t], min(s.n, round(a * s.n)))
                counts[t] = budget.clip(t, counts, wanted)
                prev = counts[t] / s.n
                rows.append((obs, prev))
            key = tuple(counts)
            if key not in cache:
                cache[key] = score(counts)
            reward = cache[key]
            if state.baseline is None:
                state.baseline = reward
            _remember_episode(agent, [obs for obs, _ in rows], counts, spaces, reward - state.baseline)
            state.baseline = 0.95 * state.baseline + 0.05 * reward
            if state.episode >= ddpg.warmup_episodes:
                for _ in range(ddpg.updates_per_step * len(spaces)):
                    agent.update(rng, ddpg.batch_size)
                state.sigma *= ddpg.sigma_decay
            if reward > state.best_reward:
                state.best_reward, state.best_counts = reward, list(counts)
            state.curve.append({"episode": state.episode + 1, "reward": reward, "counts": list(counts)})
            log.info(
                "adc episode %d/%d: reward %.4f (best %.4f) kept %s",
                state.episode + 1,
                episodes,
                reward,
                state.best_reward,
                counts,
            )
            state.episode += 1
            advance()
            if path is not None:
                save_checkpoint(
                    path, {"agent": agent.state_dict(), "rng": _rng_to(rng), "search": vars(state)}
                )
    return state


def _episode_states(spaces: list[Space], flops: FlopsModel, counts: list[int]) -> list[np.ndarray]:
    """The states an episode that ends with `counts` walks through."""
    walked = [s.n for s in spaces]
    out, prev = [], 1.0
    for t, s in enumerate(spaces):
        out.append(_states(spaces, flops, walked, t, prev))
        walked[t] = counts[t]
        prev = counts[t] / s.n
    return out


def _remember_episode(
    agent: Agent, states: list[np.ndarray], counts: list[int], spaces: list[Space], advantage: float
) -> None:
    """One transition per step; the reward (relative to the baseline) arrives at the last step."""
    for t, obs in enumerate(states):
        last = t == len(states) - 1
        nxt = obs if last else states[t + 1]
        act = counts[t] / spaces[t].n
        agent.remember([*obs.tolist(), act, advantage if last else 0.0, *nxt.tolist(), float(last)])


def _rng_to(rng: np.random.Generator) -> dict[str, Any]:
    s = rng.bit_generator.state
    return {
        "state": str(s["state"]["state"]),
        "inc": str(s["state"]["inc"]),
        "has": s["has_uint32"],
        "uint": s["uinteger"],
    }


def _rng_from(saved: dict[str, Any]) -> dict[str, Any]:
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": int(saved["has"]),
        "uinteger": int(saved["uint"]),
    }


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, batches: list[Batch], tensors: GroupTensors, removed: Sequence[int]
) -> None:
    """Re-estimate BatchNorm running statistics of the pruned network on `batches` (no weight change)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or not batches:
        return
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    for x, _ in batches:
        model(x)
    for m, (momentum, training) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.train(training)
    for i in removed:
        tensors.zero(i)


def _finetune(model, tensors: GroupTensors, removed: list[int], train, epochs: int, lr: float, seed: int):
    if epochs <= 0:
        return []

    def keep_zero(m: nn.Module, epoch: int, step: int) -> None:
        for i in removed:
            tensors.zero(i)

    history = train_loop(
        model,
        train,
        epochs=epochs,
        optimizer=make_optimizer(model, lr),
        step_hook=keep_zero,
        seed=seed,
        desc="adc fine-tune",
    )
    keep_zero(model, 0, 0)
    return history


# ---- latency table ---------------------------------------------------------------------------------
def _slim_latency(
    pruner: Pruner, counts: list[int], inputs, runtime: str, threads: int, runs: int, repeats: int = 1
) -> float:
    from slimship.slimming.api import slim

    pruner.apply(counts)
    slimmed = slim(pruner.model, inputs).model
    return measure_latency_ms(slimmed, inputs, runtime, threads, runs, repeats)


def build_latency_table(
    pruner: Pruner,
    spaces: list[Space],
    inputs: tuple[Any, ...],
    runtime: str,
    threads: int,
    fractions: Sequence[float],
    runs: int,
    min_ms: float,
) -> LatencyTable:
    """Measure the dense model and each space alone at each kept fraction (`min_ms`: all at minimum)."""
    full = [s.n for s in spaces]
    dense_ms = _slim_latency(pruner, full, inputs, runtime, threads, runs)
    log.info("adc latency table on %s: dense %.4f ms, all at minimum %.4f ms", runtime, dense_ms, min_ms)
    points: dict[str, list[tuple[float, float]]] = {}
    with _progress("adc latency table", len(spaces)) as advance:
        for t, s in enumerate(spaces):
            pts = []
            for f in sorted(set(fractions)):
                c = max(1, round(f * s.n))
                if c >= s.n:
                    continue
                counts = list(full)
                counts[t] = c
                pts.append((c / s.n, _slim_latency(pruner, counts, inputs, runtime, threads, runs)))
            points[s.name] = pts
            advance()
    pruner.apply(full)
    return LatencyTable(runtime, threads, dense_ms, min_ms, points)


def close_latency_loop(
    budget: Budget,
    counts: list[int],
    measure: Callable[[list[int]], float],
    margin: float = 0.05,
    rounds: int = 6,
    what: str = "latency budget",
    where: str = "the target",
    caps: list[int] | None = None,
    snap: Snap = list,
) -> tuple[list[int], list[dict[str, Any]]]:
    """Measure `counts` on the target; while over ``(1 - margin) x budget.limit``, tighten and re-measure.

    With `caps` (the largest count per space), a policy measured more than `margin` under that goal is
    then grown towards it the same way (model rescaled at the policy, every kept fraction scaled up by
    one common factor), while the rounds last and the growth stays within the goal: the budget is used,
    not left idle. The largest policy measured within the goal is chosen. `snap` maps every policy to
    one the target runs well (e.g. channel counts aligned to the multiple its kernels favour).

    Each round rescales the latency model at the current policy by measured/predicted (the table limit
    becomes ``min(limit, predicted) * goal / measured``) and shrinks every kept fraction by one common
    factor until the model predicts the new limit. Returns the first policy measured within the goal
    (else the fastest one within the budget) and every check in order (counts, predicted and measured
    ms, chosen). Raises CompressionError naming `where` when no measured policy meets the budget after
    `rounds` measurements or at every space's minimum.
    """
    limit = budget.limit
    goal = limit * (1 - margin)
    checks: list[dict[str, Any]] = []
    counts = snap(list(counts))
    try:
        for _ in range(rounds):
            predicted = budget.cost(budget.fractions(counts))
            measured = measure(counts)
            checks.append({"counts": list(counts), "predicted_ms": predicted, "measured_ms": measured})
            log.info(
                "adc latency check on %s: predicted %.4f ms, measured %.4f ms", where, predicted, measured
            )
            if measured <= goal or counts == budget.min_counts:
                break
            # rescale the latency model at this policy by measured / predicted
            budget.limit = min(budget.limit, predicted) * goal / measured
            counts = shrink_to_budget(counts, budget, snap)
        while caps is not None and len(checks) < rounds:
            last = checks[-1]
            if not last["measured_ms"] < goal * (1 - margin):
                break
            budget.limit = last["predicted_ms"] * goal / last["measured_ms"]
            bigger = grow_to_budget(last["counts"], budget, caps, snap)
            if bigger == last["counts"]:
                break
            predicted, measured = budget.cost(budget.fractions(bigger)), measure(bigger)
            checks.append({"counts": list(bigger), "predicted_ms": predicted, "measured_ms": measured})
            log.info(
                "adc latency fill on %s: predicted %.4f ms, measured %.4f ms", where, predicted, measured
            )
            if measured > goal:
                break
    finally:
        budget.limit = limit
    within = [c for c in checks if c["measured_ms"] <= limit]
    if not within:
        last = checks[-1]
        floor = " with every space at min_keep" if last["counts"] == budget.min_counts else ""
        raise CompressionError(
            f"{what} on {where} was not met after {len(checks)} measured round(s): the last policy measured "
            f"{last['measured_ms']:.4f} ms (predicted {last['predicted_ms']:.4f} ms) against {limit:.4f} ms"
            f"{floor}; raise the budget, lower min_keep or raise latency_rounds"
        )
    in_goal = [c for c in within if c["measured_ms"] <= goal]
    chosen = (
        max(in_goal, key=lambda c: sum(c["counts"]))
        if in_goal
        else min(within, key=lambda c: c["measured_ms"])
    )
    for c in checks:
        c["chosen"] = c is chosen
    return list(chosen["counts"]), checks


def grow_to_budget(counts: list[int], budget: Budget, caps: list[int], snap: Snap = list) -> list[int]:
    """Scale every kept fraction up by the largest common factor (fine grid) within budget and caps."""
    best = list(counts)
    for factor in np.linspace(1.0, 4.0, 301)[1:]:
        trial = snap([min(cap, max(c, math.floor(factor * c))) for c, cap in zip(counts, caps, strict=True)])
        if budget.cost(budget.fractions(trial)) > budget.limit * (1 + 1e-9):
            break
        best = max(best, trial, key=sum)
    return best


def shrink_to_budget(counts: list[int], budget: Budget, snap: Snap = list) -> list[int]:
    """Scale every kept fraction by the largest common factor (fine grid) the budget allows.

    Always removes at least one channel (after `snap`, one step of its multiple) from the widest space
    above its minimum, so a loop progresses.
    """
    for factor in np.linspace(1.0, 0.0, 201)[1:]:
        raw = [max(m, math.floor(factor * c)) for c, m in zip(counts, budget.min_counts, strict=True)]
        trial = snap(raw)
        if trial != counts and budget.cost(budget.fractions(trial)) <= budget.limit * (1 + 1e-9):
            return trial
    fallback = list(counts)
    while fallback != budget.min_counts:
        room = [f / sp.n if f > m else -1.0 for f, sp, m in zip(fallback, budget.spaces, budget.min_counts)]
        widest = max(range(len(room)), key=lambda t: (room[t], -t))
        fallback[widest] = max(budget.min_counts[widest], fallback[widest] - 1)
        if snap(fallback) != counts:
            return snap(fallback)
    return list(budget.min_counts)


def aligned_counts(counts: list[int], spaces: list[Space], multiple: int) -> list[int]:
    """Each kept count rounded down to a multiple of `multiple` (at least one multiple); a space that is
    kept whole or is no wider than the multiple stays as it is."""
    out = []
    for c, space in zip(counts, spaces, strict=True):
        if c >= space.n or space.n <= multiple:
            out.append(c)
        else:
            out.append(max(multiple, c - c % multiple))
    return out
