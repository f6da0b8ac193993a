"""Drop Pruning: iterative prune-retrain with stochastic drop-out and drop-in of whole channel groups.

The pruning stage is cut into ``rounds``. At the start of each round, every space first drops back in
each pruned group with probability ``drop_in`` (never in the last round), with the values it had when it
was dropped (``revive="restore"``; dropping masks a group, it does not forget it) or as a noisy copy of
a random active group of the same space (``revive="copy"``), then drops out enough active groups to reach
this round's share of the space's ``target``: they are drawn without replacement from the ``pool`` x
needed lowest-norm active groups with probability inversely proportional to their norm (the last round
takes the lowest-norm ones: nothing drops back in after it), and set to exactly zero.
Pruned groups are held at zero (gradients and values) while the rest retrains; fine-tuning ends the run.
Randomness comes from a generator seeded by ``(seed, round)``, so a resumed run draws the same groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimship.compress.checks import check_choice, check_fraction, check_int, check_number
from slimship.compress.device import decision_generator
from slimship.compress.hspg import epoch_stages, finish
from slimship.compress.registry import CompressResult, register
from slimship.compress.sparsifier import (
    CRITERIA,
    Sparsifier,
    TargetOptions,
    check_steps,
    register_sparsifier,
    train_with,
)
from slimship.compress.training import Batch, Training, working_copy
from slimship.compress.views import Block
from slimship.errors import CompressionError

log = logging.getLogger(__name__)

#: how a dropped-in group comes back: its values from when it was dropped, or a noisy copy of a live group
REVIVALS = ("restore", "copy")


def check_dropping(rounds: int, drop_in: float, pool: float, revive: str, criterion: str) -> None:
    """Drop's own options: rounds >= 1, drop_in in [0, 1], pool >= 1, a known revival and criterion."""
    check_fraction("drop_in", drop_in, high_open=False)
    check_choice("criterion", criterion, CRITERIA)
    check_choice("revive", revive, REVIVALS)
    check_int("rounds", rounds, low=1)
    check_number("pool", pool, low=1.0)


@register_sparsifier("drop")
class Drop(Sparsifier):
    """Rounds of stochastic drop-out / drop-in of whole groups, zeros held in between."""

    state_keys = ("round", "revived", "snapshots", "has_snapshot")
    local_keys = ("snapshots",)

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        pruning_steps: int | None = None,
        rounds: int = 5,
        drop_in: float = 0.2,
        pool: float = 2.0,
        revive: str = "restore",
        criterion: str = "magnitude",
        **options: Any,
    ) -> None:
        check_dropping(rounds, drop_in, pool, revive, criterion)
        check_steps(pruning_steps=pruning_steps)
        super().__init__(
            model,
            example_inputs,
            total_steps=total_steps,
            **options,  # the options every sparsifier takes: target, space_targets, spaces, seed
        )
        end = max(rounds, round(0.6 * total_steps)) if pruning_steps is None else pruning_steps
        if not rounds <= end <= total_steps:
            raise CompressionError(
                f"pruning_steps={end} must hold the {rounds} rounds and fit in the run's {total_steps} steps"
            )
        self.rounds, self.drop_in, self.pool, self.revive, self.criterion = (
            rounds,
            drop_in,
            pool,
            revive,
            criterion,
        )
        self.starts = [round(r * end / rounds) for r in range(rounds)]
        self.round = -1
        self.revived = 0
        self.snapshots = [[torch.zeros_like(m) for m in b.full()] for b in self.views]
        self.has_snapshot = torch.zeros_like(self.zero)

    def on_rebind(self) -> None:
        """Sharded: snapshots of this rank's chunks; a noisy copy of another group's values would read
        rows other ranks hold, so ``revive='copy'`` is refused."""
        if self.views.group is not None and self.revive == "copy":
            raise CompressionError(
                "drop: revive='copy' copies a live group's values into a revived one, which under FSDP may "
                "sit on another rank; use revive='restore' (the default) with a sharded model"
            )
        self.snapshots = [[torch.zeros_like(m) for m in b.full()] for b in self.views]

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "round_starts": list(self.starts),
            "drop_in": self.drop_in,
            "pool": self.pool,
            "revive": self.revive,
            "criterion": self.criterion,
        }

    def on_backward(self) -> None:
        if self.step in self.starts and self.starts.index(self.step) > self.round:
            self.round = self.starts.index(self.step)
            self.run_round(self.round)

    def run_round(self, r: int) -> None:
        gen = decision_generator(self.device, self.seed * 1_000_003 + r)
        last = r == self.rounds - 1
        back = torch.zeros_like(self.zero)
        if not last:
            for members in self.spaces.values():
                mine = self.zero[members]
                if bool(mine.any()) and not bool(mine.all()):
                    draws = torch.rand(len(members), generator=gen, device=self.device)
                    back[members] = mine & (draws < self.drop_in)
            for i, block in enumerate(self.views):
                if bool(back[block.rows].any()):
                    self.bring_back(i, block, back[block.rows], gen)
            self.zero &= ~back
            self.has_snapshot &= ~back
        revived = int(back.sum())
        new = self.draw_out(r, last, gen)
        if self.revive == "restore" and not last:
            for i, block in enumerate(self.views):
                rows = new[block.rows][:, None]
                self.snapshots[i] = [torch.where(rows, v, s) for v, s in zip(block.full(), self.snapshots[i])]
            self.has_snapshot |= new
        self.zero |= new
        self.views.zero(self.zero)
        self.holding = True
        self.revived += revived
        log.info(
            "drop: round %d/%d: %d groups dropped out, %d dropped back in",
            r + 1,
            self.rounds,
            int(new.sum()),
            revived,
        )

    def draw_out(self, r: int, last: bool, gen: torch.Generator) -> torch.Tensor:
        """Groups dropped out this round: drawn from each space's lowest-scored active ones."""
        scores = self.scores(self.criterion)
        magnitude = scores if isinstance(scores, torch.Tensor) else scores[0]
        new = torch.zeros_like(self.zero)
        eligible = ~self.zero
        for space, members in self.spaces.items():
            need = round(self.quota[space] * (r + 1) / self.rounds) - int(self.zero[members].sum())
            if need <= 0:
                continue
            active = int(eligible[members].sum())
            take = need if last else min(active, max(need, math.ceil(self.pool * need)))
            candidates = self.least(scores, space, eligible, take)
            weights = 1.0 / (magnitude[candidates] + 1e-12)
            new[candidates[torch.multinomial(weights, need, replacement=False, generator=gen)]] = True
        return new

    def bring_back(self, i: int, block: Block, back: torch.Tensor, gen: torch.Generator) -> None:
        """Revive the block's rows in `back`: restored from their snapshot, or a noisy copy of a live row."""
        full = block.full()
        rest = back
        if self.revive == "restore":
            use = back & self.has_snapshot[block.rows]
            full = [torch.where(use[:, None], s, f) for s, f in zip(self.snapshots[i], full, strict=True)]
            rest = back & ~use
        if bool(rest.any()):
            copies = self.copies(block, full, gen)
            full = [torch.where(rest[:, None], c, f) for c, f in zip(copies, full, strict=True)]
        block.set_full(full)

    def copies(self, block: Block, full: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        """Per row, a noisy copy of a random live row of the block (small noise if none is live)."""
        live = (~self.zero[block.rows]).nonzero().flatten()
        n_params = len(block.params)
        if len(live) == 0:
            noise = [
                0.01 * torch.randn(f.shape, generator=gen, device=self.device, dtype=f.dtype) for f in full
            ]
            return noise[:n_params] + full[n_params:]
        donors = live[torch.randint(len(live), (len(block),), generator=gen, device=self.device)]
        copies = [f[donors] for f in full]
        for k in range(n_params):
            spread = (
                copies[k].std(dim=1, keepdim=True) if copies[k].shape[1] > 1 else torch.ones_like(copies[k])
            )
            noise = torch.randn(copies[k].shape, generator=gen, device=self.device, dtype=copies[k].dtype)
            copies[k] = copies[k] + 0.1 * spread * noise
        return copies

    def decisions(self) -> dict[str, Any]:
        return {**super().decisions(), "revived": self.revived}


@dataclass(frozen=True)
class DropOptions(TargetOptions):
    """The options of :func:`drop` (see its documentation); ``drop(..., options=DropOptions(...))``."""

    target: float = 0.5
    space_targets: dict[str, float] | None = None
    spaces: list[str] | None = None
    pruning_epochs: int | None = None
    rounds: int = 5
    drop_in: float = 0.2
    pool: float = 2.0
    revive: str = "restore"
    criterion: str = "magnitude"

    def check(self) -> None:
        super().check()
        check_dropping(self.rounds, self.drop_in, self.pool, self.revive, self.criterion)


@register("drop", training=Training(), options=DropOptions)
def drop(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None = None,
    *,
    training: Training,
    options: DropOptions,
) -> CompressResult:
    """Iterative stochastic prune-retrain on channel groups towards `target` group sparsity per space."""
    pruning_epochs = options.pruning_epochs
    model = working_copy(model)
    if pruning_epochs is None:
        pruning_epochs = max(options.rounds, round(0.6 * training.epochs))
    n, _, pruning = epoch_stages(training, train, 0, pruning_epochs, "pruning_epochs")
    sp = Drop(
        model,
        example_inputs,
        total_steps=training.epochs * n,
        target=options.target,
        space_targets=options.space_targets,
        spaces=options.spaces,
        seed=training.seed,
        pruning_steps=pruning,
        rounds=options.rounds,
        drop_in=options.drop_in,
        pool=options.pool,
        revive=options.revive,
        criterion=options.criterion,
    )
    history = train_with(sp, model, train, test, training)
    extra = {
        "rounds": options.rounds,
        "drop_in": options.drop_in,
        "revived": sp.revived,
        "round_starts": sp.starts,
    }
    return finish(sp, model, history, test, extra, training)
