"""Sparsifiers: compression methods as objects that any training loop drives.

    sp = slimship.compress.sparsifier("hesso", model, example_inputs, total_steps=len(loader) * epochs)
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        sp.after_backward()   # edits gradients (held zeros, centripetal terms); reads Taylor scores
        optimizer.step()
        sp.after_step()       # projections, shrinking, drop-out / drop-in, holding zeros and clusters

Works with any optimizer; with AMP call ``scaler.unscale_(optimizer)`` before ``after_backward()``; with
DistributedDataParallel pass the wrapped model (its ``.module`` is used). Decisions that depend on data
are averaged across ranks and random draws come from generators seeded alike on every rank, so all ranks
decide alike. ``state_dict()`` / ``load_state_dict()`` resume from the user's checkpoints.

One class per method in :data:`SPARSIFIERS`; ``compress(name, ...)`` drives the same classes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from slimship.compress.base import (
    Batch,
    Training,
    check_choice,
    check_fraction,
    load_builtin_methods,
    maybe_accuracy,
    prunable_groups,
)
from slimship.compress.device import device_of, mean_across_ranks, unwrap
from slimship.compress.views import GroupViews
from slimship.errors import CompressionError

#: name -> sparsifier class (filled by ``@register_sparsifier``)
SPARSIFIERS: dict[str, type[Sparsifier]] = {}

#: how groups are ranked for removal: by normalised norm, or salience (rank sum of norm and Taylor score)
CRITERIA = ("salience", "magnitude")


def register_sparsifier(name: str) -> Callable[[type[Sparsifier]], type[Sparsifier]]:
    """Class decorator: make `cls` available as ``sparsifier(name, ...)``."""

    def wrap(cls: type[Sparsifier]) -> type[Sparsifier]:
        if SPARSIFIERS.get(name, cls) is not cls:
            raise CompressionError(f"sparsifier {name!r} is registered twice")
        cls.name = name
        SPARSIFIERS[name] = cls
        return cls

    return wrap


def sparsifier_options(name: str) -> dict[str, Any]:
    """The keyword options of sparsifier `name` (besides model, example_inputs, total_steps)."""
    options: dict[str, Any] = {}
    for klass in _lookup(name).__mro__:  # an __init__ taking **options passes them to its parent's
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                options.setdefault(p.name, p.default)
        if all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in params):
            break
    options.pop("total_steps", None)  # required, given apart
    return options


def _lookup(name: str) -> type[Sparsifier]:
    load_builtin_methods()
    if name not in SPARSIFIERS:
        raise CompressionError(
            f"no sparsifier {name!r}; allowed: {', '.join(sorted(SPARSIFIERS)) or '(none)'}"
        )
    return SPARSIFIERS[name]


def sparsifier(name: str, model: nn.Module, example_inputs: Any, *, total_steps: int, **options: Any):
    """The sparsifier of method `name` on `model` (plain or DDP-wrapped) for a run of `total_steps`."""
    cls = _lookup(name)
    allowed = sparsifier_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CompressionError(
            f"sparsifier {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"allowed options: {', '.join(sorted(allowed))}"
        )
    return cls(model, example_inputs, total_steps=total_steps, **options)


def space_fractions(
    by_space: dict[str, list[int]], target: float, space_targets: dict[str, float] | None
) -> dict[str, float]:
    """Fraction of each space's groups to remove: `target`, or the space's entry in `space_targets`."""
    overrides = dict(space_targets or {})
    unknown = sorted(set(overrides) - set(by_space))
    if unknown:
        raise CompressionError(
            f"space_targets names {unknown}, which are not prunable spaces here; known: {sorted(by_space)}"
        )
    return {s: check_fraction(f"space_targets[{s!r}]", overrides.get(s, target)) for s in by_space}


def stage_steps(total: int, warmup: int | None, middle: int | None, what: str) -> tuple[int, int]:
    """(first, end) step of a method's middle stage: defaults 25% warm-up, 40% middle."""
    warmup = max(1, round(0.25 * total)) if warmup is None else warmup
    middle = max(1, round(0.4 * total)) if middle is None else middle
    if warmup < 0 or middle < 1 or warmup + middle > total:
        raise CompressionError(
            f"warmup={warmup} and {what}={middle} must fit in the run's {total} steps "
            f"(warmup >= 0, {what} >= 1)"
        )
    return warmup, warmup + middle


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of each value (ties by position)."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=values.device)
    return ranks


class Sparsifier:
    """Shared ground: prunable groups per space, per-space quotas, the held-zero mask, the step counter.

    Subclasses implement ``on_backward`` / ``on_step`` (called under ``torch.no_grad()``) and list their
    decision state in ``state_keys``. ``self.step`` counts completed optimizer steps.
    """

    name: ClassVar[str] = ""
    state_keys: ClassVar[tuple[str, ...]] = ()
    #: zero the consuming slices of held groups too (magnitude pruning's importance includes them)
    hold_consumers: ClassVar[bool] = False

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
    ) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise CompressionError(f"total_steps must be a positive int, got {total_steps!r}")
        self.model = unwrap(model)
        self.device = device_of(self.model)
        self.total_steps, self.seed = total_steps, int(seed)
        self.target = check_fraction("target", target)
        found, by_space = prunable_groups(self.model, example_inputs, spaces)
        self.fractions = fractions = space_fractions(by_space, self.target, space_targets)
        order = [i for idx in by_space.values() for i in idx]
        self.groups = [found.groups[i] for i in order]
        self.views = GroupViews(self.model, self.groups)
        members: dict[str, list[int]] = {}
        for local, g in enumerate(self.groups):
            members.setdefault(g.space, []).append(local)
        self.spaces = {s: torch.tensor(m, device=self.device) for s, m in members.items()}
        #: each group's space as a number (the order of `spaces`), and each space's first group
        self.space_of = torch.tensor(
            [k for k, m in enumerate(members.values()) for _ in m], dtype=torch.long, device=self.device
        )
        self.space_first = torch.tensor([m[0] for m in members.values()], device=self.device)
        self.quota = {s: min(round(fractions[s] * len(m)), len(m) - 1) for s, m in self.spaces.items()}
        self.step = 0
        self.zero = torch.zeros(len(self.groups), dtype=torch.bool, device=self.device)
        self.holding = False  # python-side: any zero decided yet (saves a device sync per step)

    # ---- the loop's two calls ----------------------------------------------------------------------
    def after_backward(self) -> None:
        """Call after ``loss.backward()`` (after ``scaler.unscale_`` with AMP), before the optimizer step."""
        with torch.no_grad():
            self.on_backward()
            if self.holding:
                self.views.zero(self.zero, grads=True, consumers=self.hold_consumers)

    def after_step(self) -> None:
        """Call after ``optimizer.step()``."""
        with torch.no_grad():
            self.on_step()
            if self.holding:
                self.views.zero(self.zero, consumers=self.hold_consumers)
        self.step += 1

    def on_backward(self) -> None:
        """Method hook after backward (gradients present)."""

    def on_step(self) -> None:
        """Method hook after the optimizer step; ``self.step`` is the 0-based index of that step."""

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Decision state (tensors, numbers, lists): save it beside the model and optimizer."""
        state = {"method": self.name, "step": self.step, "zero": self.zero.clone()}
        for key in self.state_keys:
            value = getattr(self, key)
            state[key] = value.clone() if isinstance(value, torch.Tensor) else _copy(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (tensors move to the model's device)."""
        if state.get("method") != self.name:
            raise CompressionError(
                f"sparsifier state is for {state.get('method')!r}, not {self.name!r}; "
                "load the state saved by the same method"
            )
        self.step = int(state["step"])
        self.zero = state["zero"].to(self.device).clone()
        self.holding = bool(self.zero.any())
        for key in self.state_keys:
            value = state[key]
            setattr(
                self,
                key,
                value.to(self.device).clone()
                if isinstance(value, torch.Tensor)
                else _move(value, self.device),
            )

    # ---- reports -----------------------------------------------------------------------------------
    def decisions(self) -> dict[str, Any]:
        """What the method decided so far, as plain lists (compared across ranks and runs)."""
        return {"zero": self.zero.nonzero().flatten().tolist()}

    def summary(self) -> dict[str, Any]:
        """Group sparsity per space: groups exactly zero now, groups decided, groups in total."""
        measured = self.views.is_zero().cpu()
        decided = self.zero.cpu()
        spaces = {
            s: {"zero": int(measured[m.cpu()].sum()), "decided": int(decided[m.cpu()].sum()), "total": len(m)}
            for s, m in self.spaces.items()
        }
        return {
            "method": self.name,
            "step": self.step,
            "group_sparsity": float(measured.float().mean()) if len(measured) else 0.0,
            "spaces": spaces,
        }

    def per_space(self) -> dict[str, list[int]]:
        """space -> [groups exactly zero, groups]."""
        return {s: [v["zero"], v["total"]] for s, v in self.summary()["spaces"].items()}

    # ---- ranking, shared by the methods -------------------------------------------------------------
    def magnitude(self) -> torch.Tensor:
        """Norm of each group per value (comparable across layouts), averaged across ranks."""
        return mean_across_ranks(self.views.norms() / self.views.sizes.sqrt())

    def scores(self, criterion: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Removal scores: magnitude, or (magnitude, Taylor) for ``salience`` (lowest goes first)."""
        check_choice("criterion", criterion, CRITERIA)
        if criterion == "magnitude":
            return self.magnitude()
        return self.magnitude(), mean_across_ranks(self.views.taylor())

    def least(
        self, scores: torch.Tensor | tuple[torch.Tensor, ...], space: str, eligible: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Indices of the `k` least important eligible groups of `space`, least first.

        With several scores the order is the sum of per-score ranks among the eligible groups.
        """
        members = self.spaces[space]
        ok = eligible[members]
        parts = scores if isinstance(scores, tuple) else (scores,)
        inf = torch.tensor(math.inf, dtype=parts[0].dtype, device=self.device)
        if len(parts) == 1:
            key = torch.where(ok, parts[0][members], inf)
        else:
            key = sum(_ranks(torch.where(ok, p[members], inf)) for p in parts).to(parts[0].dtype)
            key = torch.where(ok, key, inf)
        order = torch.argsort(key, stable=True)
        return members[order[: min(k, int(ok.sum()))]]

    def least_each(self, scores: torch.Tensor, eligible: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        """Mask of the ``need[space]`` least scored eligible groups of every space (as :meth:`least` per
        space, in a few tensor ops for all spaces: no loop, no device sync). Spaces hold consecutive groups.
        """
        inf = torch.tensor(math.inf, dtype=scores.dtype, device=self.device)
        order = torch.argsort(torch.where(eligible, scores, inf), stable=True)
        # by space, then score, then index (index_select: indexing with [] is several times slower on CPU)
        order = order.index_select(0, torch.argsort(self.space_of.index_select(0, order), stable=True))
        space = self.space_of.index_select(0, order)
        place = torch.arange(len(order), device=self.device) - self.space_first.index_select(0, space)
        keep = (place < need.index_select(0, space)) & eligible.index_select(0, order)
        return torch.zeros_like(eligible).index_copy_(0, order, keep)


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value.clone() if isinstance(value, torch.Tensor) else value


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value.to(device).clone() if isinstance(value, torch.Tensor) else value


# ---- slimship's own loop drives the same objects ------------------------------------------------------
def steps_per_epoch(train: Iterable[Batch] | None) -> int:
    if train is None:
        raise CompressionError("this method trains: pass training batches (train=...)")
    try:
        return len(train)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in train)


def train_with(
    sp: Sparsifier,
    model: nn.Module,
    train: Iterable[Batch],
    test: Iterable[Batch] | None,
    training: Training,
    epoch_record: Callable[[], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """`training.run` with `sp` as its hooks; the sparsifier's state rides in the training checkpoint."""
    state: dict[str, Any] = {}

    def grad_hook(m: nn.Module, epoch: int, step: int) -> None:
        if sp.step != step:  # resumed from a checkpoint: the loop restored `state` in place
            sp.load_state_dict(state["sparsifier"])
        sp.after_backward()

    def epoch_hook(m: nn.Module, epoch: int, step: int) -> dict[str, Any]:
        state["sparsifier"] = sp.state_dict()  # saved with the checkpoint right after this hook
        record = (
            epoch_record() if epoch_record is not None else {"group_sparsity": sp.summary()["group_sparsity"]}
        )
        acc = maybe_accuracy(m, test)
        if acc is not None:
            record["test_accuracy"] = acc
        return record

    return training.run(
        model,
        train,
        desc=sp.name,
        grad_hook=grad_hook,
        step_hook=lambda m, e, s: sp.after_step(),
        epoch_hook=epoch_hook,
        state=state,
    )
