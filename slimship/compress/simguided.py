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

from slimship.compress.base import (
    Batch,
    CompressResult,
    GroupTensors,
    Training,
    check_fraction,
    make_optimizer,
    maybe_accuracy,
    prunable_groups,
    register,
    train_loop,
    working_copy,
)
from slimship.compress.device import mean_across_ranks
from slimship.compress.sparsifier import Sparsifier, register_sparsifier, steps_per_epoch, train_with
from slimship.errors import CompressionError
from slimship.slimming.graph import get_tensor, slice_index
from slimship.slimming.trace import as_input_tuple

log = logging.getLogger(__name__)


def schedule(target: float, steps: int, power: float = 3.0) -> list[float]:
    """Sparsities of `steps` pruning steps, rising to `target` (cubic: fast at first, gentle at the end)."""
    if steps < 1:
        raise CompressionError(f"option 'prune_steps' must be >= 1, got {steps}")
    return [target * (1 - (1 - (k + 1) / steps) ** power) for k in range(steps)]


@register_sparsifier("magnitude")
class Magnitude(Sparsifier):
    """Iterative magnitude pruning: at each of `prune_steps` cuts (spread over the first `pruning_steps`),
    the groups with the smallest norm (producing and consuming slices) join the cut set, following the
    cubic :func:`schedule` up to each space's target; cut groups, consumers included, are held at zero."""

    state_keys = ("cuts_done",)
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
        if prune_steps < 1 or not prune_steps <= end <= total_steps:
            raise CompressionError(
                f"prune_steps={prune_steps} must be >= 1 and pruning_steps={end} must hold them and fit "
                f"in the run's {total_steps} steps"
            )
        self.cuts = [round(k * end / prune_steps) for k in range(prune_steps)]
        self.shares = [1 - (1 - (k + 1) / prune_steps) ** 3 for k in range(prune_steps)]
        self.cuts_done = 0

    def on_backward(self) -> None:
        if self.cuts_done < len(self.cuts) and self.step >= self.cuts[self.cuts_done]:
            self.cut(self.cuts_done)
            self.cuts_done += 1

    def cut(self, k: int) -> None:
        norms = mean_across_ranks(self.views.norms(consumers=True))
        for space, members in self.spaces.items():
            want = min(round(self.fractions[space] * self.shares[k] * len(members)), len(members) - 1)
            have = int(self.zero[members].sum())
            if want > have:
                self.zero[self.least(norms, space, ~self.zero, want - have)] = True
        self.views.zero(self.zero, consumers=True)
        self.holding = True


class SpaceMasks:
    """Per space: which groups are cut for good, and the groups under a given sparsity's threshold.

    A group's importance is the L2 norm of its producing and consuming slices together. The simulation
    masks the consuming slices: the reduced network then computes exactly what it would with the groups
    removed, while the masked channels still carry activations, so their consuming weights get gradients
    and can grow back.
    """

    def __init__(self, model: nn.Module, tensors: GroupTensors, by_space: dict[str, list[int]]):
        self.tensors = tensors
        self.by_space = by_space
        self.cut: set[int] = set()
        self.consume = [
            [(t := get_tensor(model, name), slice_index(dim, pos, t.dim())) for name, dim, pos in g.consume]
            for g in tensors.groups
        ]

    def norms(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.tensors.norms() ** 2
            for i, slices in enumerate(self.consume):
                out[i] += sum(float(t[idx].double().pow(2).sum()) for t, idx in slices)
        return out.sqrt()

    def below(self, sparsity: float) -> list[int]:
        """Groups with the smallest norms, `sparsity` of each space (always leaving one group)."""
        norms = self.norms()
        out = []
        for indices in self.by_space.values():
            k = min(round(sparsity * len(indices)), len(indices) - 1)
            ranked = sorted(indices, key=lambda i: (i not in self.cut, float(norms[i]), i))
            out += ranked[:k]
        return out

    @torch.no_grad()
    def hold_cut(self) -> None:
        for i in self.cut:
            self.tensors.zero(i)
            for t, idx in self.consume[i]:
                t[idx] = 0


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
    if train is None:
        raise CompressionError(f"{kind} needs training data (train batches)")
    target = check_fraction("target", target)
    if kind == "magnitude":
        return _magnitude(
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
    model = working_copy(model)
    found, by_space = prunable_groups(model, as_input_tuple(example_inputs))
    indices = [i for idx in by_space.values() for i in idx]
    tensors = GroupTensors(model, found.groups)
    masks = SpaceMasks(model, tensors, by_space)
    history: list[dict[str, Any]] = []
    optimizer = make_optimizer(model, lr, weight_decay=weight_decay)
    for step, sparsity in enumerate(schedule(target, prune_steps)):
        desc = f"{kind} step {step + 1}/{prune_steps} (sparsity {sparsity:.3f})"
        if kind == "magnitude":
            masks.cut = set(masks.below(sparsity))
            masks.hold_cut()
            records = train_loop(
                model,
                train,
                epochs=epochs_per_step,
                optimizer=optimizer,
                step_hook=lambda m, e, s: masks.hold_cut(),
                seed=seed + step,
                desc=desc,
            )
        else:
            records = _simulated_training(
                model, train, masks, sparsity, epochs_per_step, optimizer, seed + step, desc
            )
            masks.cut = set(masks.below(sparsity))
            masks.hold_cut()
        regrown = sum(int(r.get("regrown", 0)) for r in records)
        history += [{**r, "prune_step": step + 1, "sparsity": sparsity} for r in records]
        log.info("%s: cut %d groups, %d regrown during the step", desc, len(masks.cut), regrown)
    history += [
        {**r, "prune_step": "finetune"}
        for r in train_loop(
            model,
            train,
            epochs=finetune_epochs,
            optimizer=optimizer,
            step_hook=lambda m, e, s: masks.hold_cut(),
            seed=seed + prune_steps,
            desc=f"{kind} fine-tune",
        )
    ]
    masks.hold_cut()
    model.eval()
    cut = sorted(masks.cut)
    info = {
        "target": target,
        "group_sparsity": len(cut) / max(len(indices), 1),
        "kept_channels": {
            s: [len([i for i in idx if i not in masks.cut]), len(idx)] for s, idx in by_space.items()
        },
        "schedule": schedule(target, prune_steps),
        "test_accuracy": maybe_accuracy(model, test),
    }
    return CompressResult(model=model, method=kind, history=history, info=info)


def _magnitude(
    model: nn.Module,
    example_inputs: Any,
    train: Iterable[Batch],
    test: Iterable[Batch] | None,
    target: float,
    prune_steps: int,
    epochs_per_step: int,
    finetune_epochs: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> CompressResult:
    """`compress("magnitude")`: the Magnitude sparsifier in slimship's loop (SGD with momentum)."""
    model = working_copy(model)
    n = steps_per_epoch(train)
    epochs = prune_steps * epochs_per_step + finetune_epochs
    training = Training(
        epochs=epochs, lr=lr, weight_decay=weight_decay, lr_schedule="constant", seed=seed, lr_floor=0.0
    )
    sp = Magnitude(
        model,
        as_input_tuple(example_inputs),
        total_steps=max(epochs * n, 1),
        target=target,
        seed=seed,
        prune_steps=prune_steps,
        pruning_steps=prune_steps * epochs_per_step * n,
    )
    history = train_with(sp, model, train, test, training)
    per_space = sp.per_space()
    info = {
        "target": target,
        "group_sparsity": sp.summary()["group_sparsity"],
        "kept_channels": {s: [total - zero, total] for s, (zero, total) in per_space.items()},
        "schedule": schedule(target, prune_steps),
        "test_accuracy": maybe_accuracy(model, test),
    }
    return CompressResult(model=model, method="magnitude", history=history, info=info)


def _simulated_training(model, train, masks: SpaceMasks, sparsity, epochs, optimizer, seed, desc):
    """Train with gradients taken on the simulated reduced network and applied to the full weights."""
    saved: dict[int, list[torch.Tensor]] = {}
    first: list[int] = []

    def simulate(m: nn.Module) -> None:
        saved.clear()
        with torch.no_grad():
            for i in masks.below(sparsity):
                if i in masks.cut:
                    continue
                saved[i] = [t[idx].clone() for t, idx in masks.consume[i]]
                for t, idx in masks.consume[i]:
                    t[idx] = 0

    def restore(m: nn.Module, epoch: int, step: int) -> None:
        with torch.no_grad():
            for i, values in saved.items():
                for (t, idx), v in zip(masks.consume[i], values, strict=True):
                    t[idx] = v
        saved.clear()

    def after_step(m: nn.Module, epoch: int, step: int) -> None:
        masks.hold_cut()
        simulate(m)

    def end_epoch(m: nn.Module, epoch: int, step: int) -> dict[str, Any]:
        restore(m, epoch, step)  # leave the full network in place between epochs and at the end
        now = set(masks.below(sparsity))
        regrown = len(set(first) - now) if first else 0
        first[:] = sorted(now)
        simulate(m)
        return {"masked": len(now), "regrown": regrown}

    masks.hold_cut()
    first[:] = masks.below(sparsity)
    simulate(model)
    history = train_loop(
        model,
        train,
        epochs=epochs,
        optimizer=optimizer,
        grad_hook=restore,
        step_hook=after_step,
        epoch_hook=end_epoch,
        seed=seed,
        desc=desc,
    )
    restore(model, 0, 0)
    return history


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
    return register(kind)(method)


simguided = _method("simguided", "Simulation-guided iterative pruning to group sparsity `target`.")
magnitude = _method("magnitude", "Iterative magnitude pruning of channel groups to `target` (baseline).")
