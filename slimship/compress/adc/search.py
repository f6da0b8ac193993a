"""ADC's search: DDPG episodes over the channel spaces, each policy scored by a user-supplied `evaluate`.

    result = adc_search(model, example_inputs, evaluate, target_flops_kept=0.5, episodes=60)
    apply_policy(model, example_inputs, result.policy)   # zeros the removed groups; slim removes them

`evaluate(pruned_model) -> float` (higher is better) runs the user's own validation loop on a pruned copy
of the model, on the model's device. Under torchrun every rank runs the search; each reward is averaged
across ranks before the agent sees it and the agent draws from generators seeded alike on every rank, so
all ranks end with the same policy. ``compress("adc", ...)`` runs the same search (:func:`search_policies`)
with an `evaluate` built from its validation batches.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimship.compress.adc.agent import (
    DDPG,
    Agent,
    agent_state,
    episode_states,
    remember_episode,
    rng_from_state,
    rng_state,
    truncated_normal,
)
from slimship.compress.adc.budget import Budget, FlopsModel, Space, build_spaces, uniform_counts
from slimship.compress.adc.policy import AdcPolicy, Pruner, importance_scores, recalibrate_batchnorm
from slimship.compress.checks import (
    check_batches,
    check_int,
    check_module,
    check_number,
    refuse,
    with_overrides,
)
from slimship.compress.device import device_of, mean_across_ranks, rank, score_dtype, unwrap
from slimship.compress.groups import prunable_groups
from slimship.compress.training import Batch, load_checkpoint, progress, save_checkpoint, working_copy
from slimship.errors import CompressionError
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)

SEARCHES = ("ddpg", "uniform")

#: the user's score of a pruned model (higher is better)
Evaluate = Callable[[nn.Module], float]


@dataclass
class SearchState:
    """Where a DDPG search stands (saved in its checkpoint)."""

    episode: int = 0
    sigma: float = 0.5
    baseline: float | None = None
    best_reward: float = -math.inf
    best_counts: list[int] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Setup:
    """What a search walks: the working copy, its spaces (graph order), FLOPs model and pruner."""

    model: nn.Module
    spaces: list[Space]
    flops: FlopsModel
    pruner: Pruner

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.spaces]


def prepare(
    model: nn.Module,
    inputs: tuple[Any, ...],
    importance: str = "magnitude",
    batches: Sequence[Batch] = (),
    spaces: Sequence[str] | None = None,
) -> Setup:
    """The prunable spaces of `model` (searched in place: pass a copy) and their ranking by `importance`."""
    found, by_space = prunable_groups(model, inputs, spaces)
    walked, flops = build_spaces(model, inputs, found.groups, by_space)
    scores = importance_scores(model, found.groups, importance, list(batches))
    return Setup(model, walked, flops, Pruner(model, found.groups, walked, scores))


def check_keep(min_keep: float, max_keep: float) -> None:
    """Both keep fractions in (0, 1], min_keep <= max_keep (CompressionError naming them)."""
    check_number("option 'min_keep'", min_keep, 0.0, 1.0, low_open=True, high_open=False)
    check_number("option 'max_keep'", max_keep, 0.0, 1.0, low_open=True, high_open=False)
    if min_keep > max_keep:
        raise CompressionError(f"options need 0 < min_keep <= max_keep <= 1, got {min_keep}, {max_keep}")


def flops_budget(setup: Setup, target_flops_kept: float | None, min_keep: float) -> Budget:
    """A FLOPs budget of `target_flops_kept` x the dense FLOPs (CompressionError if out of reach)."""
    if target_flops_kept is None or not 0 < target_flops_kept <= 1:
        raise CompressionError(f"option 'target_flops_kept' must be in (0, 1], got {target_flops_kept!r}")
    flops = setup.flops
    budget = Budget(setup.spaces, flops.flops, target_flops_kept * flops.total, min_keep)
    best = flops.flops(budget.fractions(budget.min_counts)) / flops.total
    if best > target_flops_kept:
        raise CompressionError(
            f"FLOPs budget target_flops_kept={target_flops_kept} cannot be reached: with every "
            f"space at min_keep={min_keep} the model keeps {best:.3f} of its FLOPs; "
            "lower min_keep or raise the target"
        )
    return budget


def as_reward(value: Any) -> tuple[float, str | None]:
    """`value` as a float and None, or NaN and what is wrong with it (not a real number, not finite)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan, f"returned {type(value).__name__} {str(value)[:60]!r}, not a float"
    if not math.isfinite(float(value)):
        return math.nan, f"returned {float(value)}, not a finite float"
    return float(value), None


class Scorer:
    """Rewards of kept counts: zero them on the working copy, re-estimate BatchNorm statistics on
    `calibrate`, call `evaluate` on it and average the value across ranks."""

    def __init__(self, pruner: Pruner, evaluate: Evaluate, calibrate: Sequence[Batch] = ()) -> None:
        self.pruner, self.evaluate, self.calibrate = pruner, evaluate, list(calibrate)

    def __call__(self, counts: list[int], where: str) -> float:
        removed = self.pruner.apply(counts)
        recalibrate_batchnorm(self.pruner.model, self.calibrate, self.pruner.tensors, removed)
        local, problem = as_reward(self.evaluate(self.pruner.model))
        device = device_of(self.pruner.model)
        # a bad value enters the mean as NaN, so every rank stops here together
        mean = float(mean_across_ranks(torch.tensor([local], dtype=score_dtype(device), device=device))[0])
        if problem is not None or not math.isfinite(mean):
            problem = problem or "returned a non-finite value on another rank"
            raise CompressionError(
                f"evaluate {problem} at {where} of the adc search: it must return a finite float "
                "(higher is better) for every pruned model"
            )
        return mean


def search_policies(
    setup: Setup,
    budget: Budget,
    score: Scorer,
    *,
    search: str,
    episodes: int,
    ddpg: DDPG,
    keep: tuple[float, float],
    seed_uniform: bool,
    checkpoint: str | Path | None,
    seed: int,
) -> tuple[SearchState, tuple[list[int], float] | None]:
    """The search (`search` 'ddpg' or 'uniform') and the uniform incumbent with its reward (or None)."""
    if search not in SEARCHES:
        raise CompressionError(f"option 'search' must be one of {SEARCHES}, got {search!r}")
    uniform = uniform_counts(setup.spaces, budget, keep[1])
    incumbent = None
    if seed_uniform or search == "uniform":
        incumbent = (uniform, score(uniform, "episode 0 (the uniform policy)"))
    if search == "uniform":
        return SearchState(best_counts=uniform, best_reward=incumbent[1]), incumbent
    state = run_ddpg(setup, budget, score, episodes, ddpg, keep, checkpoint, seed, incumbent)
    return state, incumbent


def run_ddpg(
    setup: Setup,
    budget: Budget,
    score: Scorer,
    episodes: int,
    ddpg: DDPG,
    keep: tuple[float, float],
    checkpoint: str | Path | None,
    seed: int,
    incumbent: tuple[list[int], float] | None = None,
) -> SearchState:
    """`episodes` DDPG episodes, one action (keep fraction in `keep`) per space, rewards from `score`.

    Only rank 0 writes `checkpoint`; a search resumes from it when it exists."""
    spaces, flops = setup.spaces, setup.flops
    agent = Agent(ddpg, seed)
    rng = np.random.default_rng(seed)
    state = SearchState(sigma=ddpg.sigma)
    if incumbent is not None:
        # the uniform policy is the incumbent the agent has to beat: its reward is the first baseline and
        # its transitions seed the replay buffer as a demonstration episode
        counts, reward = list(incumbent[0]), incumbent[1]
        state.best_counts, state.best_reward, state.baseline = counts, reward, reward
        remember_episode(agent, episode_states(spaces, flops, counts), counts, spaces, 0.0)
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.exists():
        saved = load_checkpoint(path)
        agent.load_state_dict(saved["agent"])
        rng.bit_generator.state = rng_from_state(saved["rng"])
        state = SearchState(**saved["search"])
        log.info("adc: resuming the search from %s at episode %d", path, state.episode)
    cache: dict[tuple[int, ...], float] = {}
    with progress(f"adc search ({len(spaces)} spaces)", episodes) as advance:
        for _ in range(state.episode):
            advance()
        while state.episode < episodes:
            counts, states = act(setup, budget, agent, rng, state, ddpg, keep)
            key = tuple(counts)
            if key not in cache:
                cache[key] = score(counts, f"episode {state.episode + 1}")
            learn(agent, rng, state, ddpg, setup, states, counts, cache[key])
            log.info(
                "adc episode %d/%d: reward %.4f (best %.4f) kept %s",
                state.episode,
                episodes,
                cache[key],
                state.best_reward,
                counts,
            )
            advance()
            if path is not None and rank() == 0:
                save_checkpoint(
                    path, {"agent": agent.state_dict(), "rng": rng_state(rng), "search": vars(state)}
                )
    return state


def act(
    setup: Setup,
    budget: Budget,
    agent: Agent,
    rng: np.random.Generator,
    state: SearchState,
    ddpg: DDPG,
    keep: tuple[float, float],
) -> tuple[list[int], list[np.ndarray]]:
    """One episode's kept counts (random during warm-up, else the actor plus noise; clipped to the
    budget) and the states it walked."""
    spaces, (min_keep, max_keep) = setup.spaces, keep
    counts = [s.n for s in spaces]
    states, prev = [], 1.0
    for t, s in enumerate(spaces):
        obs = agent_state(spaces, setup.flops, counts, t, prev)
        if state.episode < ddpg.warmup_episodes:
            a = float(rng.uniform(min_keep, max_keep))
        else:
            a = truncated_normal(rng, agent.act(obs), state.sigma, min_keep, max_keep)
        wanted = max(budget.min_counts[t], min(s.n, round(a * s.n)))
        counts[t] = budget.clip(t, counts, wanted)
        prev = counts[t] / s.n
        states.append(obs)
    return counts, states


def learn(
    agent: Agent,
    rng: np.random.Generator,
    state: SearchState,
    ddpg: DDPG,
    setup: Setup,
    states: list[np.ndarray],
    counts: list[int],
    reward: float,
) -> None:
    """Remember the episode (reward relative to a moving baseline), update the agent after warm-up,
    record the episode and the best policy."""
    if state.baseline is None:
        state.baseline = reward
    remember_episode(agent, states, counts, setup.spaces, reward - state.baseline)
    state.baseline = 0.95 * state.baseline + 0.05 * reward
    if state.episode >= ddpg.warmup_episodes:
        for _ in range(ddpg.updates_per_step * len(setup.spaces)):
            agent.update(rng, ddpg.batch_size)
        state.sigma *= ddpg.sigma_decay
    if reward > state.best_reward:
        state.best_reward, state.best_counts = reward, list(counts)
    state.episode += 1
    state.curve.append({"episode": state.episode, "reward": reward, "counts": list(counts)})


@dataclass
class SearchResult:
    """The best policy of an :func:`adc_search` and the search that found it."""

    policy: AdcPolicy
    reward: float  # evaluate's value of the policy (averaged across ranks)
    flops_kept: float  # predicted FLOPs of the slimmed model / dense FLOPs (1 / the flops_ratio of slim)
    rewards: list[float]  # per episode
    episodes: list[dict[str, Any]]  # per episode: number, reward, kept counts
    uniform_reward: float | None  # the uniform policy's reward (None without seed_uniform)


@dataclass(frozen=True)
class SearchOptions:
    """The options of :func:`adc_search`.

    `target_flops_kept` is the FLOPs budget, `episodes` the search length, `search` a name in
    ``SEARCHES``, `ddpg` the agent's settings (``DDPG(...)``; None: the defaults), keep ratios per space
    lie in [`min_keep`, `max_keep`], `seed_uniform` scores the uniform policy first, `calibrate` batches
    re-estimate BatchNorm statistics before each `evaluate`, `spaces` restricts the spaces searched,
    `checkpoint` is the file the search saves to and resumes from, `seed` seeds the draws.
    """

    target_flops_kept: float = 0.5
    episodes: int = 100
    ddpg: DDPG | None = None
    min_keep: float = 0.1
    max_keep: float = 1.0
    search: str = "ddpg"
    seed_uniform: bool = True
    calibrate: Iterable[Batch] = ()
    spaces: Sequence[str] | None = None
    checkpoint: str | Path | None = None
    seed: int = 0


def adc_search(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Evaluate,
    options: SearchOptions | None = None,
    **overrides: Any,
) -> SearchResult:
    """Search how much of each channel space to keep under a FLOPs budget, scoring each policy with
    `evaluate(pruned_model) -> float` (higher is better; your validation loop, on the model's device).

    The options are a :class:`SearchOptions`; keyword `overrides` name its fields
    (``adc_search(model, x, evaluate, episodes=60)``) and replace them, an unknown name is refused.
    `model` (DDP-wrapped or not) is not modified: the search prunes a copy on the same device. Before
    each `evaluate`, BatchNorm statistics are re-estimated on the `calibrate` batches when given. DDPG
    settings (warm-up episodes, exploration noise, networks) are ``ddpg``; `spaces` restricts the spaces
    searched. Under torchrun run it on every rank: all ranks return the same policy. Raises
    CompressionError when `evaluate` returns a non-finite value or no real number.
    """
    o = with_overrides("adc_search", options or SearchOptions(), overrides)
    target_flops_kept, episodes, ddpg, min_keep, max_keep = (
        o.target_flops_kept, o.episodes, o.ddpg, o.min_keep, o.max_keep
    )  # fmt: skip
    search, seed_uniform, calibrate, spaces, checkpoint, seed = (
        o.search, o.seed_uniform, o.calibrate, o.spaces, o.checkpoint, o.seed
    )  # fmt: skip
    check_module("adc_search model", model)
    if not callable(evaluate):
        raise CompressionError(f"evaluate must be a callable model -> float, got {type(evaluate).__name__}")
    check_int("option 'episodes'", episodes, 1)
    check_int("seed", seed, 0)
    if ddpg is not None and not isinstance(ddpg, DDPG):
        raise refuse("ddpg", "a DDPG(...) or None", ddpg)
    check_keep(min_keep, max_keep)
    calibrate = check_batches("calibrate", calibrate)
    ddpg = ddpg or DDPG()
    inputs = as_input_tuple(example_inputs)
    setup = prepare(working_copy(unwrap(model)).eval(), inputs, spaces=spaces)
    budget = flops_budget(setup, target_flops_kept, min_keep)
    scorer = Scorer(setup.pruner, evaluate, calibrate)
    state, incumbent = search_policies(
        setup,
        budget,
        scorer,
        search=search,
        episodes=episodes,
        ddpg=ddpg,
        keep=(min_keep, max_keep),
        seed_uniform=seed_uniform,
        checkpoint=checkpoint,
        seed=seed,
    )
    counts = state.best_counts
    return SearchResult(
        policy=setup.pruner.policy(counts),
        reward=state.best_reward,
        flops_kept=setup.flops.flops(budget.fractions(counts)) / setup.flops.total,
        rewards=[e["reward"] for e in state.curve],
        episodes=state.curve,
        uniform_reward=None if incumbent is None else incumbent[1],
    )


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
