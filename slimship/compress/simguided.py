"""Simulation-guided iterative structured pruning, and plain iterative magnitude pruning as its baseline.

Both walk a schedule of group sparsities up to `target` (per channel space: that fraction of each space's
groups is removed, one group always kept). At every pruning step:

* ``simguided``: each training step first *simulates* the reduced network: the groups under the current
  step's threshold are masked (zeroed temporarily), the loss and gradients are computed on that
  simulated network, then the full weights are restored and the gradients applied to them. Masked groups
  thus keep learning and can grow back over the threshold before the step ends; only then are the
  groups under the threshold cut for good.
* ``magnitude``: the groups with the smallest norms are cut at the start of the step and the network is
  fine-tuned with them held at zero for the same number of epochs.

Cut groups stay exactly zero, so ``slim`` removes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from slimship.compress.checks import check_fraction, check_int, check_number
from slimship.compress.device import mean_across_ranks
from slimship.compress.registry import CompressResult, register
from slimship.compress.sparsifier import (
    Sparsifier,
    check_steps,
    register_sparsifier,
    steps_per_epoch,
    train_with,
)
from slimship.compress.training import Batch, Training, maybe_accuracy, working_copy
from slimship.errors import CompressionError
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)


def schedule(target: float, steps: int, power: float = 3.0) -> list[float]:
    """Sparsities of `steps` pruning steps, rising to `target` (cubic: fast at first, gentle at the end)."""
    if steps < 1:
        raise CompressionError(f"option 'prune_steps' must be >= 1, got {steps}")
    return [target * (1 - (1 - (k + 1) / steps) ** power) for k in range(steps)]


class IterativePruning(Sparsifier):
    """`prune_steps` pruning steps spread over the first `pruning_steps` steps of the run, each cutting
    the groups with the smallest norm (producing and consuming slices together) up to the cubic
    :func:`schedule`'s share of each space's target; cut groups, consumers included, are held at zero.
    ``pruning_steps=0`` is one-shot pruning: every cut is made before the first optimizer step."""

    state_keys: tuple[str, ...] = ("cuts_done",)
    hold_consumers = True

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        *,
        total_steps: int,
        target: float = 0.5,
        space_targets: dict[str, float] | None = None,
        spaces: list[str] | None = None,
        seed: int = 0,
        prune_steps: int = 4,
        pruning_steps: int | None = None,
    ) -> None:
        check_int("prune_steps", prune_steps, low=1)
        check_steps(pruning_steps=pruning_steps)
        super().__init__(
            model,
            example_inputs,
            total_steps=total_steps,
            target=target,
            space_targets=space_targets,
            spaces=spaces,
            seed=seed,
        )
        end = max(prune_steps, round(0.8 * total_steps)) if pruning_steps is None else pruning_steps
        if prune_steps < 1 or not (end == 0 or prune_steps <= end) or not 0 <= end <= total_steps:
            raise CompressionError(
                f"prune_steps={prune_steps} must be >= 1 and pruning_steps={end} must hold them (or be 0 "
                f"for one-shot pruning) and fit in the run's {total_steps} steps"
            )
        self.bounds = [round(k * end / prune_steps) for k in range(prune_steps + 1)]
        self.shares = [1 - (1 - (k + 1) / prune_steps) ** 3 for k in range(prune_steps)]
        #: per pruning step, the groups each space has cut when the step ends (one always kept)
        self.wants = [
            torch.tensor(
                [min(round(self.fractions[s] * share * len(m)), len(m) - 1) for s, m in self.spaces.items()],
                device=self.device,
            )
            for share in self.shares
        ]
        self.cuts_done = 0

    def config(self) -> dict[str, Any]:
        return {**super().config(), "prune_bounds": list(self.bounds)}

    def below(self, k: int) -> torch.Tensor:
        """Mask of the groups under pruning step `k`'s threshold (cut groups first, one kept per space)."""
        norms = mean_across_ranks(self.views.norms(consumers=True))
        have = torch.zeros_like(self.wants[k]).index_add_(0, self.space_of, self.zero.long())
        return self.zero | self.least_each(norms, ~self.zero, self.wants[k] - have)

    def cut(self, k: int) -> None:
        self.zero = self.below(k)
        self.views.zero(self.zero, consumers=True)
        self.holding = True
        self.cuts_done = k + 1


@register_sparsifier("magnitude")
class Magnitude(IterativePruning):
    """Iterative magnitude pruning: each pruning step cuts at its start, then the network fine-tunes."""

    def on_backward(self) -> None:
        self.cut_due()

    def cut_due(self) -> None:
        """Make every cut whose pruning step has started (all of them with ``pruning_steps=0``)."""
        with torch.no_grad():
            while self.cuts_done < len(self.shares) and self.step >= self.bounds[self.cuts_done]:
                self.cut(self.cuts_done)


@register_sparsifier("simguided")
class SimGuided(IterativePruning):
    """Simulation-guided pruning: during pruning step k every forward runs on the simulated reduced network
    (the consuming slices of the groups under k's threshold masked), gradients reach the full weights
    (restored after backward), and the groups under the threshold are cut when step k ends. The first
    step of the run is not simulated (nothing is masked before the first ``after_step``)."""

    state_keys = ("cuts_done", "masked", "masking", "saved")
    local_keys = ("saved",)

    def __init__(self, model: nn.Module, example_inputs: Any, **options: Any) -> None:
        super().__init__(model, example_inputs, **options)
        if self.bounds[-1] == 0:
            raise CompressionError(
                "simguided simulates the pruned network while training: pruning_steps (epochs_per_step "
                "in compress) must be >= 1; use 'magnitude' for one-shot pruning"
            )
        self.masked = torch.zeros_like(self.zero)
        self.masking = False  # python-side copy of masked.any() (no device sync per step)
        self.positions: list[list[torch.Tensor]] = []  # per block, the masked positions of each consumer
        self.saved = self.consumers()

    def consumers(self) -> list[list[torch.Tensor]]:
        """A copy of every block's consuming tensors (this rank's chunks under FSDP)."""
        return [[s.local().detach().clone() for s in b.consume] for b in self.views]

    def on_rebind(self) -> None:
        self.saved = self.consumers()

    def on_backward(self) -> None:
        if self.masking:
            self.unmask()

    def on_step(self) -> None:
        upcoming = self.step + 1
        k = self.cuts_done
        if k < len(self.shares) and upcoming == self.bounds[k + 1]:
            self.cut(k)
            k += 1
        if k < len(self.shares) and upcoming < self.bounds[k + 1]:
            self.mask(self.below(k) & ~self.zero)

    @torch.no_grad()
    def mask(self, masked: torch.Tensor) -> None:
        """Save the consuming tensors and zero the slices of the `masked` groups."""
        self.masked, self.masking = masked, True
        self.positions = [self.consumer_masks(block) for block in self.views]
        self.saved = self.consumers()
        for i, block in enumerate(self.views):
            for s, where in zip(block.consume, self.positions[i], strict=True):
                s.local().masked_fill_(where, 0)

    @torch.no_grad()
    def unmask(self) -> None:
        """Put back the saved consuming slices of the masked groups."""
        positions = self.positions or [self.consumer_masks(block) for block in self.views]  # none if loaded
        for i, block in enumerate(self.views):
            for s, saved, where in zip(block.consume, self.saved[i], positions[i], strict=True):
                s.local().copy_(torch.where(where, saved, s.local()))
        self.masked, self.masking, self.positions = torch.zeros_like(self.zero), False, []

    def consumer_masks(self, block) -> list[torch.Tensor]:
        """Per consuming slot of `block`, the positions of the masked groups (broadcasting on the tensor)."""
        rows = self.masked.index_select(0, block.rows)
        return [s.per_position(rows, False) for s in block.consume]

    def decisions(self) -> dict[str, Any]:
        return {**super().decisions(), "masked": self.masked.nonzero().flatten().tolist()}


def check_iterative(
    target: float,
    prune_steps: int,
    epochs_per_step: int,
    finetune_epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> None:
    """The options of simguided and magnitude (checked when they run, and by a config before any work;
    every option is passed, `seed` has no rule here)."""
    check_int("prune_steps", prune_steps, low=1)
    check_int("epochs_per_step", epochs_per_step)
    check_int("finetune_epochs", finetune_epochs)
    check_number("lr", lr, low_open=True)
    check_number("weight_decay", weight_decay)
    schedule(check_fraction("target", target), prune_steps)  # checks prune_steps


def _run(
    kind: str,
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch] | None,
    test: Iterable[Batch] | None,
    target: float,
    prune_steps: int,
    epochs_per_step: int,
    finetune_epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> CompressResult:
    """`compress(kind)`: the sparsifier in slimship's loop (SGD with momentum, constant rate)."""
    if train is None:
        raise CompressionError(f"{kind} needs training data (train batches)")
    check_iterative(target, prune_steps, epochs_per_step, finetune_epochs, lr, weight_decay, seed)
    target = float(target)
    model = working_copy(model)
    n = steps_per_epoch(train)
    epochs = prune_steps * epochs_per_step + finetune_epochs
    training = Training(epochs=epochs, lr=lr, weight_decay=weight_decay, lr_schedule="constant", seed=seed)
    sp = SPARSIFIER_OF[kind](
        model,
        as_input_tuple(example_inputs),
        total_steps=max(epochs * n, 1),
        target=target,
        seed=seed,
        prune_steps=prune_steps,
        pruning_steps=prune_steps * epochs_per_step * n,
    )
    if epochs_per_step == 0:  # one-shot: every cut now, then `finetune_epochs` with the cuts held
        sp.cut_due()
    history = train_with(sp, model, train, test, training)
    summary = sp.summary()
    info = {
        "target": target,
        "group_sparsity": summary["group_sparsity"],
        "removable": summary["removable"],
        "kept_channels": {s: [total - zero, total] for s, (zero, total) in sp.per_space().items()},
        "schedule": schedule(target, prune_steps),
        "test_accuracy": maybe_accuracy(model, test),
    }
    return CompressResult(model=model, method=kind, history=history, info=info)


SPARSIFIER_OF: dict[str, type[IterativePruning]] = {"simguided": SimGuided, "magnitude": Magnitude}


def _method(kind: str, summary: str):
    """The registered function of `kind` ("simguided" or "magnitude"): both share options and schedule."""

    def method(
        model: nn.Module,
        example_inputs: Any,
        train: Iterable[Batch] | None,
        test: Iterable[Batch] | None = None,
        *,
        target: float = 0.5,
        prune_steps: int = 4,
        epochs_per_step: int = 2,
        finetune_epochs: int = 2,
        lr: float = 0.01,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> CompressResult:
        return _run(
            kind,
            model,
            example_inputs,
            train,
            test,
            target,
            prune_steps,
            epochs_per_step,
            finetune_epochs,
            lr,
            weight_decay,
            seed,
        )

    method.__name__ = method.__qualname__ = kind
    method.__doc__ = summary
    return register(kind, check=check_iterative)(method)


simguided = _method("simguided", "Simulation-guided iterative pruning to group sparsity `target`.")
magnitude = _method("magnitude", "Iterative magnitude pruning of channel groups to `target` (baseline).")
