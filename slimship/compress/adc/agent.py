"""ADC's DDPG agent: actor-critic with target networks and a replay buffer, all in plain torch on the CPU.

Every random draw (network initialisation, exploration noise, replay sampling) comes from generators
seeded by the caller, never from the global RNG, so every rank of a torchrun job builds the same agent
and, fed the same rewards, takes the same actions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from torch import nn
from torch.nn.utils import skip_init

from slimship.compress.adc.budget import FlopsModel, Space
from slimship.compress.checks import check_int, check_number


def mlp(n_in: int, hidden: int, out_act: nn.Module | None, generator: torch.Generator) -> nn.Sequential:
    """Two hidden ReLU layers and one output, initialised like ``nn.Linear`` from `generator` (the
    layers are built without their own initialisation, which would draw from the global RNG)."""

    def linear(n: int, m: int) -> nn.Linear:
        return skip_init(nn.Linear, n, m)

    layers: list[nn.Module] = [linear(n_in, hidden), nn.ReLU(), linear(hidden, hidden), nn.ReLU()]
    layers.append(linear(hidden, 1))
    if out_act is not None:
        layers.append(out_act)
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
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

    def __post_init__(self) -> None:
        for name, minimum in COUNT_RULES.items():
            check_int(f"DDPG {name}", getattr(self, name), minimum)
        for name, (low, high, low_open, high_open) in NUMBER_RULES.items():
            check_number(
                f"DDPG {name}", getattr(self, name), low, high, low_open=low_open, high_open=high_open
            )


#: DDPG's integer settings: name -> smallest value
COUNT_RULES = {"warmup_episodes": 0, "hidden": 1, "batch_size": 1, "updates_per_step": 1, "buffer_size": 1}
#: DDPG's real settings: name -> (low, high, low end open, high end open)
NUMBER_RULES = {
    "sigma": (0.0, math.inf, False, True),
    "sigma_decay": (0.0, 1.0, True, False),
    "lr_actor": (0.0, math.inf, True, True),
    "lr_critic": (0.0, math.inf, True, True),
    "tau": (0.0, 1.0, True, False),
    "gamma": (0.0, 1.0, False, False),
}


class Agent:
    """Actor-critic with target networks (soft updates) and a replay buffer, all in plain torch."""

    STATE = 8

    def __init__(self, ddpg: DDPG, seed: int) -> None:
        generator = torch.Generator().manual_seed(int(seed))
        self.actor = mlp(self.STATE, ddpg.hidden, nn.Sigmoid(), generator)
        self.critic = mlp(self.STATE + 1, ddpg.hidden, None, generator)
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


def agent_state(spaces: list[Space], flops: FlopsModel, counts: list[int], t: int, prev: float) -> np.ndarray:
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


def truncated_normal(rng: np.random.Generator, mu: float, sigma: float, lo: float, hi: float) -> float:
    if sigma <= 0:
        return float(np.clip(mu, lo, hi))
    a, b = (lo - mu) / sigma, (hi - mu) / sigma
    return float(truncnorm.rvs(a, b, loc=mu, scale=sigma, random_state=rng))


def episode_states(spaces: list[Space], flops: FlopsModel, counts: list[int]) -> list[np.ndarray]:
    """The states an episode that ends with `counts` walks through."""
    walked = [s.n for s in spaces]
    out, prev = [], 1.0
    for t, s in enumerate(spaces):
        out.append(agent_state(spaces, flops, walked, t, prev))
        walked[t] = counts[t]
        prev = counts[t] / s.n
    return out


def remember_episode(
    agent: Agent, states: list[np.ndarray], counts: list[int], spaces: list[Space], advantage: float
) -> None:
    """One transition per step; the reward (relative to the baseline) arrives at the last step."""
    for t, obs in enumerate(states):
        last = t == len(states) - 1
        nxt = obs if last else states[t + 1]
        act = counts[t] / spaces[t].n
        agent.remember([*obs.tolist(), act, advantage if last else 0.0, *nxt.tolist(), float(last)])


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    s = rng.bit_generator.state
    return {
        "state": str(s["state"]["state"]),
        "inc": str(s["state"]["inc"]),
        "has": s["has_uint32"],
        "uint": s["uinteger"],
    }


def rng_from_state(saved: dict[str, Any]) -> dict[str, Any]:
    return {
        "bit_generator": "PCG64",
        "state": {"state": int(saved["state"]), "inc": int(saved["inc"])},
        "has_uint32": int(saved["has"]),
        "uinteger": int(saved["uint"]),
    }
